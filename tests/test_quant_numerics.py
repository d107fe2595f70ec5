"""Quantization numerics against independent references (compressed-tensors, torch float8 casts, float math)."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from compressor.quant.formats import SCALE_BITS, SCALE_DTYPES, Fp8Format, IntFormat, fallback_group_size, round_scale
from compressor.quant.fp8 import fp8_dequantize, fp8_quantize
from compressor.quant.gptq import gptq_dequantized_many, gptq_quantize
from compressor.quant.linalg import damped_cholesky_factors
from compressor.quant.packing import pack_int32, pack_zero_points, unpack_int32, unpack_zero_points
from compressor.quant.rtn import dequantize, expand_groups, find_qparams, quantize_with, rtn_quantize


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [1, 7, 31, 33, 96, 577])
def test_packing_matches_compressed_tensors(bits, cols):
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), generator=g, dtype=torch.int8)
    packed = pack_int32(codes, bits)
    assert torch.equal(packed, pack_to_int32(codes, bits))
    assert torch.equal(unpack_int32(packed, bits, cols), codes)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([5, cols])), codes)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_packing_stays_on_the_codes_device(bits):
    """On the meta device any CPU tensor mixed into the computation raises, as it would with CUDA codes (loading an
    asymmetric artifact onto a GPU unpacks its zero points)."""
    packed = pack_int32(torch.zeros(5, 37, dtype=torch.int8, device="meta"), bits)
    assert packed.device.type == "meta" and packed.dtype == torch.int32 and packed.shape == (5, -(-37 * bits // 32))
    codes = unpack_int32(packed, bits, 37)
    assert codes.device.type == "meta" and codes.dtype == torch.int8 and codes.shape == (5, 37)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_ragged_groups_match_float_reference(sym, bits):
    torch.manual_seed(0)
    w = torch.randn(13, 70)
    fmt = IntFormat(bits, 32, sym)  # 70 = 32 + 32 + 6: ragged last group
    codes, scale, zero = rtn_quantize(w, fmt)
    assert scale.shape == (13, 3)
    assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    # independent reference: quantize each group separately with plain float math
    for a, b in [(0, 32), (32, 64), (64, 70)]:
        seg = w[:, a:b]
        if sym:
            extreme = torch.gather(seg, 1, seg.abs().argmax(1, keepdim=True)).squeeze(1)
            s = extreme / fmt.qmin  # the largest-magnitude weight lands exactly on qmin
            q = torch.clamp(torch.round(seg / s[:, None]), fmt.qmin, fmt.qmax)
            ref = q * s[:, None]
        else:
            lo, hi = seg.amin(1).clamp(max=0), seg.amax(1).clamp(min=0)
            s = (hi - lo) / (2**bits - 1)
            z = torch.clamp(torch.round(fmt.qmin - lo / s), fmt.qmin, fmt.qmax)
            q = torch.clamp(torch.round(seg / s[:, None]) + z[:, None], fmt.qmin, fmt.qmax)
            ref = (q - z[:, None]) * s[:, None]
        got = dequantize(codes, scale, zero, 32)[:, a:b]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_scale_puts_the_extreme_on_qmin_and_beats_the_half_range_rule(bits):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    fmt = IntFormat(bits, 64, True)
    codes, scale, _ = rtn_quantize(w, fmt)
    grouped, wg = codes.reshape(32, 4, 64), w.reshape(32, 4, 64)
    extreme = wg.abs().argmax(-1, keepdim=True)
    assert (torch.gather(grouped, -1, extreme) == fmt.qmin).all()  # every level used, the extreme exact
    assert (scale < 0).any() and (scale > 0).any()  # the scale carries the extreme's sign
    err = ((dequantize(codes, scale, None, 64) - w) ** 2).sum()
    half_range = 2 * wg.abs().amax(-1, keepdim=True) / (2**bits - 1)  # the common 2 amax / (2^b - 1) rule
    err_half = ((torch.clamp(torch.round(wg / half_range), fmt.qmin, fmt.qmax) * half_range - wg) ** 2).sum()
    assert err < 0.98 * err_half


def test_clip_search_never_increases_error():
    torch.manual_seed(1)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    w[0, 0] = 20.0  # outlier
    fmt = IntFormat(3, 64, True)
    err = {}
    for clip in (False, True):
        s, z = find_qparams(w, fmt, clip_search=clip)
        codes, _, _ = rtn_quantize(w, fmt, clip_search=clip)
        err[clip] = ((dequantize(codes, s, z, 64) - w) ** 2).sum().item()
    assert err[True] < err[False]


def test_weighted_clip_search_minimises_the_weighted_error():
    """With column weights (GPTQ: diag H), the clip search lowers the weighted rounding error below both the
    min-max range's and the unweighted search's: loud input channels get a range that suits them."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g)
    weight = torch.rand(256, generator=g) ** 4 * 100  # a few loud input channels
    fmt = IntFormat(4, 64, True)

    def weighted_error(**kw) -> float:
        s, z = find_qparams(w, fmt, **kw)
        return (((dequantize(quantize_with(w, s, z, fmt), s, z, 64) - w) ** 2) * weight).sum().item()

    weighted = weighted_error(clip_search=True, col_weight=weight)
    assert weighted < weighted_error(clip_search=True)
    assert weighted < weighted_error(clip_search=False)


def _correlated_inputs(n_tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k // 8, k, generator=g)
    return torch.randn(n_tokens, k // 8, generator=g) @ basis + 0.05 * torch.randn(n_tokens, k, generator=g)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [None, 32, 48])  # 48 does not divide 200: ragged last group
def test_gptq_beats_rtn_on_correlated_inputs(act_order, group):
    k, n = 200, 64
    x = _correlated_inputs(2048, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    fmt = IntFormat(4, group, True)
    h = x.t() @ x / x.shape[0]
    codes, scale, zero = gptq_quantize(w, h, fmt, act_order=act_order, block_size=64)
    g = fmt.effective_group(k)
    w_gptq = dequantize(codes, scale, zero, g)
    rc, rs, rz = rtn_quantize(w, fmt)
    w_rtn = dequantize(rc, rs, rz, g)
    err_gptq = ((x @ (w_gptq - w).t()) ** 2).mean().item()
    err_rtn = ((x @ (w_rtn - w).t()) ** 2).mean().item()
    assert err_gptq < 0.6 * err_rtn, (err_gptq, err_rtn)
    assert codes.dtype == torch.int8 and codes.min() >= -8 and codes.max() <= 7


def test_gptq_asymmetric_and_stacked_rows_equal_separate():
    """Rows are independent given H: solving q/k/v stacked equals solving them one by one."""
    k = 96
    x = _correlated_inputs(512, k, seed=5)
    h = x.t() @ x
    w1, w2 = torch.randn(16, k), torch.randn(8, k)
    fmt = IntFormat(4, 32, False)
    both = gptq_quantize(torch.cat([w1, w2]), h, fmt)
    one = gptq_quantize(w1, h, fmt)
    torch.testing.assert_close(both[0][:16], one[0], rtol=0, atol=0)
    torch.testing.assert_close(both[1][:16], one[1])
    assert both[2] is not None


@pytest.mark.parametrize(
    "fmt",
    [Fp8Format("tensor"), Fp8Format("channel"), Fp8Format("block", (32, 32)), Fp8Format("block", (128, 128))],
)
def test_fp8_matches_torch_casts(fmt):
    torch.manual_seed(0)
    w = torch.randn(70, 100) * torch.rand(70, 1) * 3
    q, scale = fp8_quantize(w, fmt)
    assert q.dtype == torch.float8_e4m3fn
    full = (
        scale
        if fmt.strategy != "block"
        else scale.repeat_interleave(fmt.block[0], 0).repeat_interleave(fmt.block[1], 1)[:70, :100]
    )
    ref = (w / full).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    deq = fp8_dequantize(q, scale, fmt)
    assert torch.allclose(deq, ref.to(torch.float32) * full)
    assert ((deq - w).abs() <= w.abs() * 0.0625 + 1e-3).all()  # E4M3 has 3 mantissa bits


def test_fallback_group_policy():
    assert fallback_group_size(576, 128) == 64
    assert fallback_group_size(1536, 128) == 128
    assert fallback_group_size(96, 64) == 32
    assert fallback_group_size(100, 128) is None  # no power of two >= 16 divides 100: channel-wise


def test_stacked_gptq_equals_one_format_at_a_time():

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 80, generator=gen) * torch.linspace(0.2, 3, 80)
    h = x.t() @ x / 512
    w = torch.randn(24, 80, generator=gen)
    fmts = [IntFormat(2, 16, True), IntFormat(3, 32, False), IntFormat(8, None, True)]
    many = gptq_dequantized_many(w, h, fmts, scale_dtype="float16", act_order=True)
    for fmt, got in zip(fmts, many):
        codes, scale, zero = gptq_quantize(w, h, fmt, scale_dtype="float16", act_order=True)
        torch.testing.assert_close(got, dequantize(codes, scale, zero, fmt.effective_group(80)), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_zero_points_pack_along_the_rows_like_compressed_tensors(bits):
    g = torch.Generator().manual_seed(bits)
    zero = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (37, 5), generator=g, dtype=torch.int8)
    packed = pack_zero_points(zero, bits)
    assert torch.equal(packed, pack_to_int32(zero, bits, packed_dim=0))
    assert torch.equal(unpack_zero_points(packed, bits, 37), zero)


def test_scale_dtypes_and_rounding():
    assert {name: torch.finfo(dtype).bits for name, dtype in SCALE_DTYPES.items()} == SCALE_BITS
    s = torch.tensor([1 / 3, 0.0, -7.1])
    for name, dtype in SCALE_DTYPES.items():
        got = round_scale(s, name)
        assert got.dtype == torch.float32 and torch.equal(got, s.to(dtype).to(torch.float32))
    w = torch.zeros(2, 8)
    w[0] = 1.0
    scale, _ = find_qparams(w, IntFormat(4, None, True), "float16")
    assert scale[1, 0] == 1.0  # an all-zero group gets scale 1, round_scale keeps a zero


def test_damped_cholesky_raises_damping_until_positive_definite():
    h = torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64))
    factors = damped_cholesky_factors(h, 0.01, 1.0)  # damping 0.01, 0.1 fail, 1 (the third attempt) works
    torch.testing.assert_close(next(factors), torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64)).sqrt())
    assert len(list(damped_cholesky_factors(-torch.eye(3), 0.01, 1.0, attempts=2))) == 0


def _textbook_gptq(w: torch.Tensor, h: torch.Tensor, fmt: IntFormat, damp: float = 0.01) -> torch.Tensor:
    """GPTQ without blocking, scales fixed from w: quantize each column, spread its error over every later column."""
    w = w.clone()
    k = w.shape[1]
    scale, zero = find_qparams(w, fmt)
    s = expand_groups(scale, k, fmt.effective_group(k))
    z = torch.zeros_like(s) if zero is None else expand_groups(zero, k, fmt.effective_group(k))
    lam = damp * torch.diag(h).mean().item()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h + lam * torch.eye(k))), upper=True)
    codes = torch.empty(w.shape, dtype=torch.int8)
    for i in range(k):
        q = torch.clamp(torch.round(w[:, i] / s[:, i]) + z[:, i], fmt.qmin, fmt.qmax)
        codes[:, i] = q.to(torch.int8)
        e = (w[:, i] - (q - z[:, i]) * s[:, i]) / hinv[i, i]
        w[:, i:] -= e.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
    return codes


@pytest.mark.parametrize("fmt", [IntFormat(4, 16, True), IntFormat(3, None, False), IntFormat(2, 24, False)])
def test_gptq_sweep_is_textbook_gptq(fmt):
    """One block spanning K: exactly the textbook updates; smaller blocks (and the sub-blocked sweep of
    gptq_dequantized_many) change only the float rounding of the error feedback."""
    x = _correlated_inputs(256, 72, seed=7)
    h = x.t() @ x
    w = torch.randn(20, 72, generator=torch.Generator().manual_seed(7))
    ref = _textbook_gptq(w, h, fmt)
    assert torch.equal(gptq_quantize(w, h, fmt, static_groups=True, block_size=128)[0], ref)
    codes, scale, zero = gptq_quantize(w, h, fmt, static_groups=True, block_size=20)
    assert (codes != ref).float().mean() < 0.01
    (many,) = gptq_dequantized_many(w, h, [fmt], block_size=20)
    assert torch.equal(many, dequantize(codes, scale, zero, fmt.effective_group(72)))
