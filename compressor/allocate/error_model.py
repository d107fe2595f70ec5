"""The weights a candidate format makes of a linear under the allocation's error model (`gptq` or `rtn`).

The sensitivity sweep scores every candidate of a linear with `candidates_dequantized` (GPTQ with the sweep's
input Gram matrix H, or data-free RTN / FP8 scaling), a rank candidate with `factored_dequantized` (whitened
truncation, then both factors quantized). The fallback measures whole allocations (the mix, or one candidate
everywhere): `swap_in_sequential` makes them as the quantize pass does, block by block with each input group's H
gathered from the already-quantized linears before it (true-sequential GPTQ; also for any allocation with rank
candidates, whose truncation needs H); `swap_in_data_free` with RTN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..calibration.engine import BlockSweep
from ..quant.formats import IntFormat, resolve_format
from ..quant.lowrank import decompose
from ..schema import QuantizePass, WeightScheme
from ..schema.allocate import RankChoice
from ..techniques import GptqConfig, RtnConfig, gptq_candidates, quantize_data_free
from .heldout import BlockStep, HeldOutKL


def rtn_dequantized(w: torch.Tensor, scheme, quant) -> torch.Tensor:
    """What RTN (or FP8 scaling) makes of w under `scheme`, dequantized (w itself for a float candidate)."""
    if scheme is None:
        return w
    fmt, _ = resolve_format(scheme, w.shape[1], quant.group_policy)
    return quantize_data_free(w, fmt, RtnConfig.of(quant)).dequantize()


def candidates_dequantized(
    w: torch.Tensor,
    h: torch.Tensor | None,
    schemes: list[WeightScheme | None],
    quant: QuantizePass,
    method: str,
    only: set[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Candidate index -> what that candidate's quantizer makes of w [out, in], dequantized (`keep` skipped, and
    any index outside `only` when given). GPTQ candidates (h needed) are solved together in one stacked column
    sweep (static groups)."""
    out: dict[int, torch.Tensor] = {}
    gptq_jobs: list[tuple[int, IntFormat]] = []
    for ci, scheme in enumerate(schemes):
        if scheme is None or (only is not None and ci not in only):
            continue
        fmt, _ = resolve_format(scheme, w.shape[1], quant.group_policy)
        if method == "gptq" and isinstance(fmt, IntFormat):
            gptq_jobs.append((ci, fmt))
        else:
            out[ci] = rtn_dequantized(w, scheme, quant)
    if gptq_jobs:
        solved = gptq_candidates(w, h, [fmt for _, fmt in gptq_jobs], GptqConfig.of(quant))
        out.update({ci: deq for (ci, _), deq in zip(gptq_jobs, solved)})
    return out


def candidate_rank(choice: RankChoice | None, scheme: WeightScheme | None, shape: tuple[int, int]) -> int | None:
    """The rank a rank candidate gives an [out, in] matrix (None: not a rank candidate, or no rank that makes
    this matrix smaller); a share's rank is rounded to whole groups of the factors' format."""
    if choice is None:
        return None
    group = scheme.group_size if scheme is not None and scheme.strategy == "group" else 8
    return choice.for_shape(*shape, multiple=group or 8)


def factored_dequantized(
    w: torch.Tensor, h: torch.Tensor, rank: int, scheme, quant: QuantizePass, method: str, damp: float
) -> torch.Tensor:
    """What a rank candidate makes of w [out, in]: the whitened rank-`rank` truncation B A (`quant.lowrank`, B
    refitted), A quantized with the layer's input Gram matrix h, B with its own input's (A h A^T, A as quantized),
    multiplied back; the factors as they are for a float candidate (`scheme` None)."""
    f = decompose(w, rank, "whitened", h, None, damp)
    down, up = f.down, f.up
    if scheme is not None:
        down = candidates_dequantized(down, h, [scheme], quant, method)[0]
        up = candidates_dequantized(up, down @ h.to(down.dtype) @ down.T, [scheme], quant, method)[0]
    return (up @ down).to(w.dtype)


def swap_in_data_free(
    measure: HeldOutKL, candidate_of: Callable[[str], int], schemes: list[WeightScheme | None], quant: QuantizePass
) -> BlockStep:
    """The step that swaps into `measure`, block by block, each linear's RTN (or FP8) weight at candidate
    `candidate_of(linear)` (`keep`: none)."""

    def step(i: int) -> None:
        for name in measure.linears_of(i):
            scheme = schemes[candidate_of(name)]
            if scheme is not None:
                measure.swap(name, rtn_dequantized(measure.original(name), scheme, quant))

    return step


def swap_in_sequential(
    measure: HeldOutKL,
    chunks: list[torch.Tensor],
    candidate_of: Callable[[str], int],
    schemes: list[WeightScheme | None],
    quant: QuantizePass,
    compute_dtype: torch.dtype,
    method: str = "gptq",
    rank_of: Callable[[str, int], int | None] = lambda name, ci: None,
    damp: float = 0.01,
) -> BlockStep:
    """The step that swaps into `measure`, block by block, each linear's weight at candidate `candidate_of(linear)`
    made as the quantize pass makes it (`method`: gptq or rtn), true-sequentially on the calibration `chunks`: at
    block i the calibration sweep runs that block, each input group's H gathered from inputs the already-swapped
    linears produced, its linears of one candidate solved as one stacked matrix (a rank candidate, `rank_of(name,
    candidate)` not None: each linear truncated and its factors quantized, `factored_dequantized`); the held-out
    windows then go through the swapped block. The steps must come for blocks 0, 1, 2, ... in order.

    Solving with the unquantized model's H instead misjudged a mix on the tiny test llama with one 1000x channel
    (4x too much KL for the mix, half too little for uniform INT3). `keep` linears stay as they are."""
    model, adapter = measure.model, measure.adapter
    sweep = BlockSweep(
        model, adapter.blocks(model), chunks, compute_dtype, token_clip=quant.hessian_token_clip, track_abs=False
    )
    blocks = iter(sweep)

    def changed(name: str) -> bool:
        ci = candidate_of(name)
        return schemes[ci] is not None or rank_of(name, ci) is not None

    def step(i: int) -> None:
        index, _ = next(blocks)
        if index != i:
            raise RuntimeError(f"swap_in_sequential's steps must come in block order (got block {i} at {index})")
        prefix = adapter.block_prefix(model, i)

        def solve(local_names: tuple[str, ...], stat) -> None:
            h, by_candidate = stat.mean(), {}
            for local in local_names:
                name = f"{prefix}.{local}"
                ci = candidate_of(name)
                rank = rank_of(name, ci)
                if rank is not None:
                    made = factored_dequantized(measure.original(name), h, rank, schemes[ci], quant, method, damp)
                    measure.swap(name, made)
                else:
                    by_candidate.setdefault(ci, []).append(name)
            for ci, names in by_candidate.items():
                weights = [measure.original(n) for n in names]
                deq = candidates_dequantized(torch.cat(weights), h, schemes, quant, method, {ci})[ci]
                for n, piece in zip(names, deq.split([w.shape[0] for w in weights])):
                    measure.swap(n, piece)

        groups = (
            tuple(n for n in grp if f"{prefix}.{n}" in measure.modules and changed(f"{prefix}.{n}"))
            for grp in adapter.linear_groups
        )
        sweep.run([g for g in groups if g], solve)

    return step
