"""Greedy removal (SLEB-style): drop the unit whose removal raises calibration loss (or KL) least, re-measure.

Cost control: a candidate is measured from the cached input of its own block (blocks before it are never
rerun); after a drop only the inputs of later blocks are recomputed; and after the first full round only the
`shortlist` best candidates of the previous round are re-measured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

from tqdm.auto import tqdm

from ..calibration.ranks import ONE_PROCESS, Ranks
from .runner import BlockRunner, Unit

log = logging.getLogger(__name__)


def greedy_remove(
    runner: BlockRunner,
    count: int,
    kinds: Sequence[str] = ("block",),
    objective: str = "loss",
    shortlist: int | None = 8,
    quiet: bool = False,
    ranks: Ranks = ONE_PROCESS,
) -> tuple[list[Unit], list[dict]]:
    """Units to remove, in the order chosen, and a per-step log (unit, loss, kl). In a distributed run each
    round's candidates are shared out among the ranks (`Ranks.run_assigned`)."""
    removed: list[Unit] = []
    states = runner.inputs()
    base = runner.score(states[-1])
    candidates: list[Unit] = [(i, k) for k in kinds for i in range(runner.depth)]
    steps: list[dict] = []
    progress = tqdm(total=count, desc="remove (greedy)", unit="unit", disable=quiet)
    for _ in range(count):
        units = [u for u in candidates if u not in removed and (u[0], "block") not in removed]

        def measured(unit: Unit, states=states):
            return runner.score(runner.run(unit[0], states[unit[0]], {*removed, unit}))

        scores = ranks.run_assigned([(runner.depth - u[0], partial(measured, u)) for u in units])
        results = [(s.loss - base.loss if objective == "loss" else s.kl, u, s) for u, s in zip(units, scores)]
        if not results:
            break
        results.sort(key=lambda r: (r[0], r[1]))
        value, best, s = results[0]
        removed.append(best)
        steps.append({"unit": list(best), "loss": s.loss, "kl": s.kl})
        log.debug("greedy: drop %s (%s %.4f)", best, objective, value)
        states = runner.inputs(removed, start=best[0], known=states)
        pool = [u for _, u, _ in results[1:]]
        candidates = pool[:shortlist] if shortlist else pool
        progress.update(1)
    progress.close()
    return removed, steps
