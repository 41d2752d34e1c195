"""Tensor, data and expert parallelism over torch.distributed: the layout, its process
groups, the MoE token dispatchers and the launch of one process per rank."""

from .parallel_state import Group, ParallelConfig, ParallelState, destroy, shard_range

__all__ = ["Group", "ParallelConfig", "ParallelState", "destroy", "shard_range"]
