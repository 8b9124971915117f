"""torch.distributed helpers: the same code runs as one process or under torchrun.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) `init()` joins the
process group: NCCL when the run uses CUDA, gloo otherwise. Without torchrun every
helper degrades to the single-process answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from protoquant.errors import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend_for(device: torch.device) -> str:
    """gloo on the CPU; on GPUs NCCL for CUDA tensors and gloo for the CPU tensors that
    bookkeeping (counts, gathered scores) still reduces."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device) -> Context:
    """Join the process group if launched by torchrun (idempotent); returns this process's context.

    Raises:
        ConfigError: `device` is not available here (e.g. CUDA without a GPU).
    """
    problem = device_problem(device)
    if problem:
        raise ConfigError(problem)
    if not launched_by_torchrun():
        return Context()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device))
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def context() -> Context:
    """The current context without initialising anything."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Context()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard_for_rank(items: np.ndarray, ctx: Context) -> np.ndarray:
    """This rank's strided share of `items` (every item goes to exactly one rank)."""
    return items[ctx.rank :: ctx.world_size]


def rank_batches(items: np.ndarray, batch_size: int, seed: int, epoch: int, ctx: Context) -> list[np.ndarray]:
    """This rank's part of every global batch of one epoch.

    The epoch's order is a permutation seeded by (seed, epoch), the same on every rank;
    global batch b is order[b * batch_size : (b + 1) * batch_size] and rank r trains on
    its slice [r::world_size]. With DDP averaging gradients, a run on n processes thus
    takes the same steps as one process with the same `batch_size`. The order is padded
    by wrapping to a multiple of world_size so every rank takes the same number of steps.
    """
    if batch_size % ctx.world_size:
        raise ValueError(
            f"batch size {batch_size} must be divisible by the number of processes {ctx.world_size}"
        )
    order = np.random.default_rng((seed, epoch)).permutation(items)
    if ctx.world_size > 1:
        order = np.resize(order, -(-len(order) // ctx.world_size) * ctx.world_size)
    return [order[i : i + batch_size][ctx.rank :: ctx.world_size] for i in range(0, len(order), batch_size)]


def gather_strided(local: torch.Tensor, total: int, ctx: Context) -> torch.Tensor:
    """Reassemble rows computed for `shard_for_rank(range(total))` into all `total` rows, on every rank."""
    if not ctx.distributed:
        return local
    rows = -(-total // ctx.world_size)
    padded = torch.zeros(rows, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    out = torch.empty(total, *local.shape[1:], dtype=local.dtype, device=local.device)
    for rank, part in enumerate(parts):
        count = len(range(rank, total, ctx.world_size))
        out[rank :: ctx.world_size] = part[:count]
    return out


def broadcast_object(value, ctx: Context):
    """Rank 0's `value` (any picklable object) on every rank; `value` itself in one process."""
    if not ctx.distributed:
        return value
    objects = [value]
    dist.broadcast_object_list(objects, src=0, device=torch.device("cpu"))  # the gloo side of the group
    return objects[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


ACCELERATORS = {  # device type -> (the availability check as users read it, its function)
    "cuda": ("torch.cuda.is_available()", lambda: torch.cuda.is_available()),
    "mps": ("torch.backends.mps.is_available()", lambda: torch.backends.mps.is_available()),
    "xpu": ("torch.xpu.is_available()", lambda: hasattr(torch, "xpu") and torch.xpu.is_available()),
}


def device_problem(name: str | torch.device) -> str | None:
    """Why device `name` cannot be used on this machine ("cuda" without a GPU), or None."""
    try:
        device = torch.device("cpu" if name == "auto" else name)
    except RuntimeError:
        return f"device {str(name)!r} is not a torch device (auto, cpu, cuda, cuda:N, mps or xpu)"
    if device.type not in ACCELERATORS:
        return None
    check, available = ACCELERATORS[device.type]
    if not available():
        return f"device {str(name)!r} requested but {check} is False (no GPU / driver)"
    return None


def resolve_device(name: str) -> torch.device:
    """The device this process computes on.

    "auto" is CUDA when available, else the CPU. A CUDA device without an index is the
    process's own GPU: cuda:LOCAL_RANK under torchrun (one GPU per process), cuda:0 otherwise.

    Raises:
        ConfigError: the device is not available here (no GPU / driver), names a GPU this
            process cannot see, or, with several processes on a node, names a GPU other than
            cuda:LOCAL_RANK (NCCL refuses two ranks on one GPU).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    problem = device_problem(name)
    if problem:
        raise ConfigError(problem)
    device = torch.device(name)
    if device.type != "cuda":
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.index is not None and local_world > 1 and device.index != local_rank:
        raise ConfigError(
            f"device {name!r}: the {local_world} processes on this node would not have a GPU each "
            f"(this one, LOCAL_RANK {local_rank}, would compute on GPU {device.index}); give the "
            "device without an index ('cuda') and each process takes cuda:LOCAL_RANK"
        )
    if device.index is None:
        device = torch.device("cuda", local_rank)
    visible = torch.cuda.device_count()
    if device.index >= visible:
        raise ConfigError(
            f"device {name!r} means GPU {device.index} for this process (LOCAL_RANK "
            f"{local_rank}), but {visible} GPU(s) are visible: start at most "
            f"{visible} processes per node (torchrun --nproc_per_node {visible})"
        )
    torch.cuda.set_device(device)
    return device
