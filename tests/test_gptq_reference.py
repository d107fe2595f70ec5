"""Our GPTQ solver (`compressor/quant/gptq.py`) against a plain, loop-based reference of the published algorithm
(Frantar et al. 2022, as in IST-DASLab/gptq `GPTQ.fasterquant` and `Quantizer.find_params`), bit for bit on the
integer codes, scales and zero points, over every option combination we ship.

The reference runs in float32 with the same torch operations as the published code (a bit-for-bit comparison is
meaningful only if both sides round the same way). Codes are signed, qmin..qmax; the published code stores unsigned
codes 0..2^b-1 with zero point 2^(b-1) on symmetric grids: the same grid shifted, dequantized identically.

Where our solver intentionally differs from the published one, the reference takes the difference as an option
(the published value is the default) and the comparison runs with ours; `test_each_documented_difference_is_exercised`
checks that options 1, 4 and 5 do change the result on such layers, so a match is not vacuous:

1. `rule`: the scale rule. Published symmetric: scale = 2 amax / (2^b - 1), zero point 2^(b-1) (and a scale of
   xmax / (2^b - 1) when no weight is negative). Ours ("signed"): scale = extreme / qmin, signed, so the
   largest-magnitude weight lands exactly on qmin (`quant/rtn.py` qparams_from_range). Asymmetric: the same scale
   (max - min) / (2^b - 1); our zero point is computed as clamp(round(qmin - min / scale)) (the same integer).
2. part of the "signed" rule: scales are rounded to their storage dtype (`scale_dtype`, float16 by default) before
   any code is chosen, and an all-zero group gets scale 1 (published: float32 scales; the range [-1, 1]).
3. `clip`: our clip search shrinks the range by 20 factors down to 0.75 keeping the least squared rounding error,
   each column's error weighted by diag(H) (published `mse`: the unweighted 2.4-norm over 80 factors down to
   0.21). The reference implements ours only.
4. `dead_first`: channel-wise scales are fitted after the dead inputs' weights (diag H = 0) are zeroed (published:
   before, so a dead input can widen a row's range although its weight never matters).
5. `current_groups`: dynamic groups are fitted, at the group's first column, to the weights as they are then: the
   error of every earlier column fed back, including the pending lazy-batch update of the columns past the block.
   Published: `W[:, col:col + groupsize]`, the weights at the start of the block, which miss the feedback of the
   block's earlier columns whenever a group starts mid-block (group size 64 with block size 128, say).
6. act-order always uses static groups (scales from the unpermuted weight, contiguous groups, no g_idx to store);
   the published act-order with dynamic groups forms groups along the permuted order. The reference supports
   act-order with static groups only; our `static_groups: false` under act-order is compared with it.
7. damping: lambda = damp * mean(diag H) computed in float64 and rounded once when added (published: a float32
   product), and raised tenfold until H + lambda I is positive definite (published: fails). Random layers here
   never need the raise.
8. `inner`: `gptq_dequantized_many` (bit allocation's candidates) spans the rank-1 updates over 32-column
   sub-blocks, carrying each sub-block's error to the rest of the block by one product, with fused updates: the same
   arithmetic up to rounding. The reference takes the same sub-blocks and the same fused operations.

The token-norm clip of H (`hessian_token_clip`) happens where H is gathered, before the solver: not a solver option.
The last tests check the per-layer diagnostics (`quantize.diagnostics`, report.json `gptq_diagnostics`).
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from conftest import small_recipe
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import compressor
from compressor.calibration.engine import GramStat
from compressor.quant.formats import IntFormat
from compressor.quant.gptq import SweepStats, gptq_dequantized_many, gptq_quantize, rtn_clamped
from compressor.quant.rtn import dequantize, rtn_quantize
from compressor.schema import QuantizePass

# ---- the reference ------------------------------------------------------------------------------------------


def ref_params(x, bits, sym, *, rule="published", scale_dtype="float32", clip=False, weight=None):
    """Scale and signed zero point [rows] of the weights x [rows, cols] (published `Quantizer.find_params`);
    `weight` [cols]: the clip search's column weights (ours: diag H)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    maxq = qmax - qmin
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0]))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0]))

    def fit(xmin, xmax):
        if rule == "published":
            if sym:
                xmax = torch.maximum(xmin.abs(), xmax)
                xmin = torch.where(xmin < 0, -xmax, xmin)
            both_zero = (xmin == 0) & (xmax == 0)
            xmin, xmax = torch.where(both_zero, -1.0, xmin), torch.where(both_zero, 1.0, xmax)
            scale = (xmax - xmin) / maxq
            zero = torch.zeros_like(scale) if sym else torch.round(-xmin / scale) + qmin
            return scale, zero
        scale = torch.where(xmax >= -xmin, xmax, xmin) / qmin if sym else (xmax - xmin) / maxq
        scale = scale.to(getattr(torch, scale_dtype)).float()
        scale = torch.where(scale == 0, 1.0, scale)
        zero = torch.zeros_like(scale) if sym else torch.clamp(torch.round(qmin - xmin / scale), qmin, qmax)
        return scale, zero

    scale, zero = fit(xmin, xmax)
    if clip:
        best = ref_error(x, scale, zero, qmin, qmax, weight)
        for i in range(1, 21):
            p = 1.0 - 0.25 * i / 20
            scale1, zero1 = fit(xmin * p, xmax * p)
            err = ref_error(x, scale1, zero1, qmin, qmax, weight)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, scale1, scale), torch.where(better, zero1, zero)
    return scale, zero


def ref_error(x, scale, zero, qmin, qmax, weight=None):
    """Squared rounding error of each row of x on the grid (scale, zero) [rows], columns weighted by `weight`."""
    s, z = scale[:, None], zero[:, None]
    error = (s * (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) - x) ** 2
    return (error if weight is None else error * weight).sum(1)


def reference_gptq(
    W,
    H,
    bits,
    group,
    sym,
    *,
    blocksize=128,
    percdamp=0.01,
    actorder=False,
    static_groups=False,
    dead_first=False,
    current_groups=False,
    inner=None,
    **params,
):
    """GPTQ of W [rows, columns] given H [columns, columns]: codes [rows, columns] (int, original column order),
    scale and zero [rows, groups], and per row the number of codes the grid's ends clamped. `params` go to
    `ref_params` (rule, scale_dtype, clip); the other options are listed in the module docstring. Long because it
    is the published algorithm in one piece, as its reference code writes it."""
    assert not (actorder and group is not None and not static_groups), "act-order uses static groups (6.)"
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    find = functools.partial(ref_params, bits=bits, sym=sym, **params)
    W, H = W.float().clone(), H.float().clone()
    rows, columns = W.shape
    if group is None and not dead_first:
        channel = find(W, weight=torch.diag(H))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    hdiag = torch.diag(H).clone()  # the clip search's column weights (original order, undamped)
    if group is None and dead_first:
        channel = find(W, weight=hdiag)
    groups = []
    if group is not None and static_groups:
        groups = [find(W[:, i : i + group], weight=hdiag[i : i + group]) for i in range(0, columns, group)]

    perm = torch.arange(columns)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    damp = percdamp * torch.mean(torch.diag(H)).item()
    diag = torch.arange(columns)
    H[diag, diag] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(rows, columns, dtype=torch.int64)
    clamped = torch.zeros(rows, dtype=torch.int64)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        step = inner or count
        for j1 in range(0, count, step):
            j2 = min(j1 + step, count)
            for i in range(j1, j2):
                col = i1 + i
                if group is None:
                    scale, zero = channel
                elif static_groups:
                    scale, zero = groups[perm[col] // group]
                elif col % group == 0:
                    if current_groups:
                        inside = W1[:, i : i + group]
                        rest = group - inside.shape[1]
                        # (Err1[:, :i] copied contiguous as ours is: a product's rounding depends on the layout)
                        pending = W[:, i2 : i2 + rest] - Err1[:, :i].contiguous() @ Hinv[i1:col, i2 : i2 + rest]
                        groups.append(find(torch.cat([inside, pending], dim=1), weight=hdiag[col : col + group]))
                    else:
                        groups.append(find(W[:, col : col + group], weight=hdiag[col : col + group]))
                    scale, zero = groups[-1]
                w = W1[:, i]
                d = Hinv1[i, i]
                q = torch.round(w / scale) + zero
                clamped += (q < qmin) | (q > qmax)
                q = torch.clamp(q, qmin, qmax)
                codes[:, col] = q.long()
                err1 = (w - scale * (q - zero)) / d
                if inner is None:
                    W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                else:
                    W1[:, i:j2].addr_(err1, Hinv1[i, i:j2], alpha=-1.0)
                Err1[:, i] = err1
            if inner is not None:
                W1[:, j2:].addmm_(Err1[:, j1:j2], Hinv1[j1:j2, j2:], alpha=-1.0)
        if inner is None:
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        else:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)

    codes = codes[:, torch.argsort(perm)]
    if group is None:
        return codes, channel[0][:, None], channel[1][:, None], clamped
    return codes, torch.stack([s for s, _ in groups], 1), torch.stack([z for _, z in groups], 1), clamped


# ---- the comparison -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """The reference on one thread, as our sweep runs (and many tiny ops run faster so)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OURS = {"rule": "signed", "dead_first": True, "current_groups": True}  # the documented differences, ours
ORDERS = {  # (act_order, static_groups) as a recipe sets them
    "in-order": (False, False),
    "static-groups": (False, True),
    "act-order": (True, False),  # act-order implies static groups (6.)
    "act-order-static": (True, True),
}


def random_layer(rows: int, k: int, seed: int, dead: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [rows, k] with uneven row scales and the mean Gram matrix [k, k] of correlated inputs with uneven
    channel scales, `dead` of them always zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    x = (x + 0.1 * torch.randn(4 * k, k, generator=g)) * torch.rand(k, generator=g) * 3
    x[:, torch.randperm(k, generator=g)[:dead]] = 0
    w = torch.randn(rows, k, generator=g) * (0.1 + torch.rand(rows, 1, generator=g))
    return w, x.t() @ x / x.shape[0]


def check_same(w, h, fmt: IntFormat, block: int, order: str, scale_dtype: str = "float16", clip: bool = False):
    """Ours and the reference (with our options) agree bit for bit: codes, scales, zero points, clamp counts."""
    act_order, static_groups = ORDERS[order]
    stats = SweepStats()
    codes, scale, zero = gptq_quantize(
        w,
        h,
        fmt,
        scale_dtype=scale_dtype,
        block_size=block,
        act_order=act_order,
        static_groups=static_groups,
        clip_search=clip,
        stats=stats,
    )
    static = static_groups or act_order
    rcodes, rscale, rzero, rclamped = reference_gptq(
        w, h, fmt.bits, fmt.group_size, fmt.symmetric, blocksize=block, actorder=act_order, static_groups=static,
        scale_dtype=scale_dtype, clip=clip, **OURS,
    )  # fmt: skip
    assert torch.equal(codes.long(), rcodes), f"{(codes.long() != rcodes).sum()} codes differ"
    assert torch.equal(scale, rscale)
    assert torch.equal(torch.zeros_like(rzero) if zero is None else zero, rzero)
    assert torch.equal(stats.clamped, rclamped)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("group", [None, 16, 24, 64], ids=lambda g: f"g{g}" if g else "channel")
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_matches_the_reference(bits, sym, group, order):
    """K = 100 in blocks of 40: groups 24 and 64 leave a ragged last group, and groups 16, 24 and 64 start
    mid-block and straddle block ends (where dynamic groups see the pending lazy-batch update)."""
    w, h = random_layer(12, 100, seed=bits * 100 + (group or 0) + sym)
    check_same(w, h, IntFormat(bits, group, sym), block=40, order=order)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    sym=st.booleans(),
    group=st.sampled_from([None, 8, 16, 32, 48, 64]),
    order=st.sampled_from(list(ORDERS)),
    block=st.integers(8, 160),
    rows=st.integers(1, 24),
    k=st.integers(16, 160),
    dead=st.integers(0, 4),
    scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    clip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gptq_matches_the_reference_on_random_shapes(
    bits, sym, group, order, block, rows, k, dead, scale_dtype, clip, seed
):
    """Any width, block size, row count, scale dtype and clip search."""
    w, h = random_layer(rows, k, seed, dead)
    check_same(w, h, IntFormat(bits, group, sym), block, order, scale_dtype, clip)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [20, 40, 128])
def test_candidate_sweep_matches_the_reference_with_sub_blocks(act_order, block):
    """`gptq_dequantized_many` (several formats stacked as rows, 32-column sub-blocks) is the reference with the
    same sub-blocks (8.), format by format."""
    w, h = random_layer(10, 100, seed=block)
    fmts = [IntFormat(2, 16, True), IntFormat(3, 24, False), IntFormat(4, 64, True), IntFormat(8, None, False)]
    many = gptq_dequantized_many(w, h, fmts, scale_dtype="float16", block_size=block, act_order=act_order)
    for fmt, got in zip(fmts, many):
        codes, scale, zero, _ = reference_gptq(
            w, h, fmt.bits, fmt.group_size, fmt.symmetric, blocksize=block, actorder=act_order,
            static_groups=fmt.group_size is not None, scale_dtype="float16", inner=32, **OURS,
        )  # fmt: skip
        assert torch.equal(got, dequantize(codes, scale, zero, fmt.effective_group(100)))


@pytest.mark.parametrize("fmt", [IntFormat(4, 16, True), IntFormat(3, 24, False), IntFormat(2, None, True)])
def test_without_feedback_gptq_is_round_to_nearest(fmt):
    """With H = I no error reaches another column: the reference gives RTN's codes, and its clamp count is
    `rtn_clamped`'s (the diagnostics' RTN baseline)."""
    w, _ = random_layer(16, 72, seed=5)
    codes, _, _, clamped = reference_gptq(
        w, torch.eye(72), fmt.bits, fmt.group_size, fmt.symmetric, static_groups=True, scale_dtype="float16", **OURS
    )
    assert torch.equal(codes, rtn_quantize(w, fmt, "float16")[0].long())
    assert torch.equal(clamped, rtn_clamped(w, fmt, "float16"))
    assert clamped.sum() > 0 or fmt.bits > 2


def test_each_documented_difference_is_exercised():
    """Each option the reference takes from ours changes the result on these layers, so a match is no accident."""
    w, h = random_layer(12, 100, seed=1)
    w[:, torch.diag(h) == 0] = 5.0  # dead inputs' weights would set the channel-wise scales
    cases = [
        ("rule", IntFormat(4, 16, True), {}),
        ("dead_first", IntFormat(4, None, True), {}),
        ("current_groups", IntFormat(4, 64, True), {"blocksize": 40}),
    ]
    for option, fmt, extra in cases:
        published = {**OURS, option: {"rule": "published"}.get(option, False)}
        ours = reference_gptq(w, h, fmt.bits, fmt.group_size, fmt.symmetric, scale_dtype="float16", **extra, **OURS)
        theirs = reference_gptq(
            w, h, fmt.bits, fmt.group_size, fmt.symmetric, scale_dtype="float16", **extra, **published
        )
        assert not torch.equal(ours[0], theirs[0]), option


def test_sweep_stats_damping():
    """The damping the stats report is damp * mean(diag H), dead inputs counted with diagonal 1."""
    w, h = random_layer(8, 40, seed=2, dead=2)
    stats = SweepStats()
    gptq_quantize(w, h, IntFormat(4, 16, True), damp=0.05, stats=stats)
    prepared = torch.diag(h).clone()
    prepared[prepared == 0] = 1.0
    assert stats.damping == pytest.approx(0.05 * prepared.mean().item(), rel=1e-6)


# ---- per-layer diagnostics (report.json `gptq_diagnostics`) --------------------------------------------------


def test_gram_stat_keeps_the_unclipped_gram_on_request():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    x[3] *= 50  # a "massive activation" token, clipped at twice the median norm
    kept, plain = GramStat(8, token_clip=2.0, keep_unclipped=True), GramStat(8)
    kept.add(x)
    plain.add(x)
    assert torch.equal(kept.mean_unclipped(), plain.mean())
    assert kept.mean()[0, 0] < plain.mean()[0, 0]
    assert torch.equal(plain.mean_unclipped(), plain.mean())  # no clip: nothing else to keep


def test_diagnostics_are_gptq_only():
    with pytest.raises(ValidationError, match="diagnostics"):
        QuantizePass(type="quantize", method="rtn", diagnostics=True)


def test_gptq_diagnostics_reach_the_report(tiny_model_dir, calib_file, tmp_path):
    """Opt-in: every GPTQ layer gets its output errors (GPTQ and RTN, under H before and after the token clip),
    clamp counts and relative damping in report.json; a run without the key has no such section."""
    recipe = small_recipe(calib_file, {"bits": 4, "group_size": 32})
    recipe["passes"][0].update(diagnostics=True, hessian_token_clip=1.5)  # a clip that acts on a random model
    model = str(tiny_model_dir("llama"))
    result = compressor.compress(recipe, model=model, output=tmp_path / "on", quiet=True)
    diagnostics = json.loads((tmp_path / "on" / "report.json").read_text())["gptq_diagnostics"]
    assert set(diagnostics) == set(result.plan.layers)
    for name, d in diagnostics.items():
        out_features, in_features = result.plan.layers[name].shape
        errors = [d[f"{h}_{m}"] for h in ("output_error", "clipped_h_error") for m in ("gptq", "rtn")]
        assert all(math.isfinite(e) and e > 0 for e in errors), (name, d)
        assert d["clipped_h_error_gptq"] < d["clipped_h_error_rtn"], (name, d)  # GPTQ wins on its own objective
        assert 0 <= d["clamped_rtn"] <= d["clamped_gptq"] <= out_features * in_features, (name, d)
        assert 0 < d["damping_to_median_diag"] < 1, (name, d)
    assert any(d["output_error_gptq"] != d["clipped_h_error_gptq"] for d in diagnostics.values())

    del recipe["passes"][0]["diagnostics"]
    plain = compressor.compress(recipe, model=model, output=tmp_path / "off", quiet=True)
    assert "gptq_diagnostics" not in json.loads((tmp_path / "off" / "report.json").read_text())
    for name, layer in result.plan.weights.items():  # diagnostics observe; they change no result
        assert torch.equal(layer.codes, plain.plan.weights[name].codes)
