"""Tensor-parallel settings, checked once (EngineConfig's `tensor_parallel_size`)."""

from __future__ import annotations

# Ranks on one host: one GPU each (or, on the CPU, one process each).
MAX_TENSOR_PARALLEL_SIZE = 64
# Runtimes with collectives wired into their ops layer.
PARALLEL_RUNTIMES = ("torch",)


def check_tensor_parallel(size: int, runtime: str, speculative: str = "off") -> None:
    """ValueError naming the key when `size` cannot run on `runtime` or with `speculative`."""
    if not 1 <= size <= MAX_TENSOR_PARALLEL_SIZE:
        raise ValueError(f"tensor_parallel_size must be between 1 and {MAX_TENSOR_PARALLEL_SIZE}, not {size}")
    if size > 1 and runtime not in PARALLEL_RUNTIMES:
        raise ValueError(
            f"tensor_parallel_size {size} needs the torch runtime (runtime = \"torch\", --runtime torch); "
            f"the {runtime} runtime runs one rank only (docs/tensor_parallel.md)")
    if size > 1 and speculative == "draft":
        raise ValueError(f"tensor_parallel_size {size} does not run with speculative = \"draft\" yet (its draft "
                         "network is not sharded); use speculative = \"ngram\" or one rank")
