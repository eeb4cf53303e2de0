"""A task whose rank 1 fails in its shard: a worker that breaks after the run started
(`--task tests.failing_task:broken`), for compare's failure path."""

from __future__ import annotations

from switchagg.workers.tasks.digits import Digits


class _Broken(Digits):
    def shard(self, rank: int, world_size: int, batch_size: int):
        if rank == 1:
            raise RuntimeError("rank 1's data is unreadable (on purpose)")
        return super().shard(rank, world_size, batch_size)


def broken(**kwargs) -> Digits:
    """The digits task, except on rank 1."""
    return _Broken(**kwargs)
