"""The torch.distributed process group of one tensor-parallel run.

Every rank lives on this host: rank 0 (the daemon) opens a TCPStore on the
loopback interface at a free port and the workers join it. The group's
backend is NCCL on GPUs and gloo on the CPU; both bootstrap over loopback
(GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME default to "lo": under systemd's
PrivateNetwork only loopback exists), and NCCL's NVLink multicast (NVLS)
stays off unless the environment says otherwise.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# How long the workers get to join the store. Joining needs only their start
# and torch's import; model loading comes after it.
JOIN_TIMEOUT_S = 120.0
# A collective that waits longer than this for a peer fails. A dead peer is
# found at once (its sockets close) and by the daemon's watch on the workers;
# this bounds only a peer that hangs while alive.
COLLECTIVE_TIMEOUT_S = 300.0


def backend_for(device: str) -> str:
    return "nccl" if device == "gpu" else "gloo"


def _environment(device: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if device == "gpu":
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def open_store(size: int) -> dist.TCPStore:
    """Rank 0's store on a free loopback port (`store.port` goes to the workers)."""
    return dist.TCPStore("127.0.0.1", 0, size, True, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S),
                         wait_for_workers=False)


def join_store(port: int, size: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, size, False, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))


def select_device(rank: int, device: str) -> None:
    """Rank r drives GPU r; before any CUDA allocation of this process."""
    if device == "gpu":
        if torch.cuda.device_count() <= rank:
            raise RuntimeError(f"tensor-parallel rank {rank} needs GPU {rank}, but "
                               f"{torch.cuda.device_count()} are visible")
        torch.cuda.set_device(rank)


def init_group(store: dist.TCPStore, rank: int, size: int, device: str) -> dist.ProcessGroup:
    """Joins the default process group (blocks until every rank has)."""
    _environment(device)
    kwargs = {}
    if device == "gpu":
        kwargs["device_id"] = torch.device("cuda", rank)  # NCCL connects now, not at the first collective
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S), **kwargs)
    group = dist.group.WORLD
    assert group is not None
    return group


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def cpu_threads(device: str, size: int) -> None:
    """On the CPU the ranks share the host's cores: each takes its part of them."""
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
