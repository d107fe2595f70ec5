"""The processes of one run (torch.distributed): who this process is, its share of the calibration, and the exact
reduction of statistics across processes.

A run is distributed when it was started by torch's launcher (`torchrun --nproc-per-node N -m compressor ...` or
`compress --nproc N`, which starts torchrun): `WORLD_SIZE` > 1 in the environment. gloo on CPU, nccl when CUDA is
there. Windows are split across ranks in whole calibration chunks (so every chunk's forward is the one a single
process runs), each rank accumulates its chunks' statistics, and `reduce_gram` adds every rank's partial sums in rank
order on every rank: with `GramStat`'s exact merging, the statistics, and so the solves and the artifact, are those of
a one-process run whatever the number of processes.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import CompressorError
from .engine import GramStat

T = TypeVar("T")
_SENT = [0]  # bytes this process sent to the others (each collective's payload x the peers that receive it)
DEFAULT_TIMEOUT_S = 1800  # a collective that waits this long fails (a rank hung or died without torchrun noticing)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes (rank 0 of 1 when the run is not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the artifact, the report and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, chunks: Sequence[T], what: str = "calibration", allow_empty: bool = False) -> list[T]:
        """This rank's contiguous share of `chunks` (whole chunks: a chunk's forward is the same on any rank). A
        share may be empty only with `allow_empty` (evaluation; a calibration share must reach every solve)."""
        if not self.distributed:
            return list(chunks)
        if len(chunks) < self.world and not allow_empty:
            raise CompressorError(
                f"{len(chunks)} {what} chunks cannot be shared by {self.world} processes (each needs at least one)",
                fix="use fewer processes (--nproc), or more calibration samples or a smaller calibration.batch_size",
            )
        lo, hi = self.share_bounds(len(chunks))
        return list(chunks[lo:hi])

    def share_bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi): the indices of this rank's contiguous share of `n` items (`shard`)."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def sum_in_rank_order(self, mine: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a float64 tensor, added in rank order (the same on every rank)."""
        if not self.distributed:
            return mine
        _injected_fault(self.rank)
        _SENT[0] += mine.numel() * mine.element_size() * (self.world - 1)
        parts = _all_gather(mine.to(torch.float64), self.world)
        total = torch.zeros_like(parts[0])
        for part in parts:
            total += part
        return total

    def reduce_gram(self, stat: GramStat) -> None:
        """Replace this rank's partial statistics by the sum over ranks, added in rank order (the same on every
        rank, and, by GramStat's exact merging, the float32 statistics of one process that saw every window)."""
        if not self.distributed:
            return
        _set_sums(stat, self.sum_in_rank_order(_flat_sums(stat)))

    def run_assigned(
        self, jobs: Sequence[tuple[float, Callable[[], T]]], progress: Callable[[int], object] | None = None
    ) -> list[T]:
        """Each job's result on every rank: jobs are given to ranks by `balanced_owners` on their costs, each
        rank runs its own, then every result is broadcast from its owner, in job order (pickled: tensors travel
        bit for bit, so results equal a one-process run's). `progress(n)` (a tqdm's update) hears of each job this
        rank runs, and of the others' jobs once their results arrive."""
        tick = progress or (lambda n: None)
        if not self.distributed:
            return [_ticked(job, tick) for _, job in jobs]
        owners = balanced_owners([cost for cost, _ in jobs], self.world)
        mine = {i: _ticked(job, tick) for i, ((_, job), owner) in enumerate(zip(jobs, owners)) if owner == self.rank}
        tick(len(jobs) - len(mine))
        results = []
        _SENT[0] += sum(len(pickle.dumps(result)) for result in mine.values()) * (self.world - 1)
        for i, owner in enumerate(owners):
            box = [mine.get(i)]
            dist.broadcast_object_list(box, src=owner)
            results.append(box[0])
        return results

    def gather(self, mine: list) -> list:
        """Every rank's list (picklable items), concatenated in rank order, on every rank."""
        if not self.distributed:
            return list(mine)
        parts: list = [None] * self.world
        _SENT[0] += len(pickle.dumps(mine)) * (self.world - 1)
        dist.all_gather_object(parts, mine)
        return [item for part in parts for item in part]

    def facts(self, peak_rss_mb: float) -> dict | None:
        """report.json `processes` of a distributed run (None otherwise): each rank's peak RSS (MiB) and the bytes
        it sent to the others (statistics, solved weights, evaluation sums), in rank order."""
        if not self.distributed:
            return None
        values: list = [None] * self.world
        dist.all_gather_object(values, (round(peak_rss_mb, 1), _SENT[0]))
        return {
            "count": self.world,
            "peak_rss_mb_after_passes": [rss for rss, _ in values],
            "bytes_sent": [sent for _, sent in values],
        }


ONE_PROCESS = Ranks()  # the default of functions that a distributed run gives its ranks to


def _ticked(job: Callable[[], T], tick: Callable[[int], object]) -> T:
    result = job()
    tick(1)
    return result


def balanced_owners(costs: Sequence[float], world: int) -> list[int]:
    """The rank that runs each job: longest job first to the least-loaded rank (ties: the lower job index, the
    lower rank), so every rank computes the same assignment without talking."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def current() -> Ranks:
    """The run's ranks: from the initialized process group, else one process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_from_launcher(timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the process group torchrun set up (gloo on CPU, nccl with CUDA); one process: nothing to join."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def shutdown(wait_for_all: bool) -> None:
    """Leave the process group. After a successful run every worker first waits for the others (rank 0 writes the
    artifact after the rest have finished): a worker that tore down its gloo threads while rank 0 still used the
    group was measured to abort ("terminate called without an active exception", SIGABRT) in 1 run of 3. After a
    failure there is no wait: the others may be inside a collective that will never complete (torchrun stops them)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_all:
        dist.barrier()
    dist.destroy_process_group()


def exit_finished_worker() -> None:
    """End a worker whose run finished (after `shutdown(wait_for_all=True)`) without the interpreter's teardown:
    with the barrier and the group destroyed, a worker still aborted in about 1 of 5 runs on a loaded machine
    ("terminate called without an active exception", SIGABRT), the way gloo's threads are known to when their
    objects are destroyed while the interpreter finalizes (pytorch/pytorch#179291). Everything the run owns is
    written and closed by now; logs and stdio are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _injected_fault(rank: int) -> None:
    """Tests only (tests/test_distributed.py): `COMPRESSOR_TEST_FAULT=RANK:raise|kill|sleep` makes that rank raise,
    SIGKILL itself or sleep at its first statistics reduction, while the other ranks wait in the collective."""
    spec = os.environ.get("COMPRESSOR_TEST_FAULT", "")
    target, _, kind = spec.partition(":")
    if not spec or int(target) != rank:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sleep":  # a rank stuck in its own work (a Ctrl-C arrives meanwhile)
        time.sleep(300)
    raise RuntimeError(f"injected fault on rank {rank}")


def _all_gather(tensor: torch.Tensor, world: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def _flat_sums(stat: GramStat) -> torch.Tensor:
    """Every float64 sum of `stat` and its token count in one flat tensor (one collective per group)."""
    pieces = [stat.h.reshape(-1), stat.abs_sum]
    if stat.h_unclipped is not None:
        pieces.append(stat.h_unclipped.reshape(-1))
    pieces.append(torch.tensor([float(stat.count)], dtype=torch.float64))
    return torch.cat(pieces)


def _set_sums(stat: GramStat, flat: torch.Tensor) -> None:
    d = stat.h.shape[0]
    stat.h = flat[: d * d].reshape(d, d).clone()
    stat.abs_sum = flat[d * d : d * d + d].clone()
    if stat.h_unclipped is not None:
        stat.h_unclipped = flat[d * d + d : 2 * d * d + d].reshape(d, d).clone()
    stat.count = int(flat[-1].item())
