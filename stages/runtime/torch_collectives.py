"""The Torch runtime's collectives for tensor parallelism (stages/parallel/):
on the process group the rank joined, gloo on the CPU, NCCL on GPUs."""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class TorchCollectives:
    """Mixed into TorchOps: a sharded model's all-reduce and all-gather."""

    _group: "dist.ProcessGroup | None" = None

    def use_process_group(self, group: "dist.ProcessGroup") -> None:
        """The group a sharded model's collectives run on (stages/parallel/group.py):
        gloo on the CPU, NCCL on GPUs."""
        self._group = group

    def all_reduce_(self, x: Tensor) -> None:
        if self._group is None:
            raise RuntimeError("all_reduce_ without a process group: a sharded model needs use_process_group")
        dist.all_reduce(x, group=self._group)

    def all_gather(self, x: Tensor, axis: int = -1) -> Tensor:
        if self._group is None:
            raise RuntimeError("all_gather without a process group: a sharded model needs use_process_group")
        world = dist.get_world_size(self._group)
        x = x.contiguous()
        # One collective into one buffer stacked along a new leading axis (NCCL
        # captures it in a CUDA graph), then the ranks' parts moved to `axis`.
        out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
        _all_gather_into(out.view(world * x.shape[0], *x.shape[1:]), x, self._group)
        return torch.cat(out.unbind(0), dim=axis)


def _all_gather_into(out: Tensor, x: Tensor, group: "dist.ProcessGroup") -> None:
    """out = every rank's x stacked along axis 0. Torch 2.13 renamed
    all_gather_into_tensor all_gather_single (the old name warns)."""
    gather = getattr(dist, "all_gather_single", None)
    if gather is not None:
        gather(out, x, group=group)
    else:
        dist.all_gather_into_tensor(out, x, group=group)
