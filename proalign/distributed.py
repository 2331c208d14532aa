"""Which process am I: the one answer for the whole package (data sharding, losses, stages)."""
from __future__ import annotations


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes shared files."""
    return rank_and_world()[0] == 0
