"""C++ kernels (torch.ops.compressor.*): every ISA path of this machine against the scalar reference (bit-exact)
and against float dequantize-then-matmul references; FP8 decode against torch's float8_e4m3fn casts. The CUDA
kernels get the same checks where a CUDA device and a CUDA build of the extension exist (skipped otherwise)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from compressor.quant.formats import Fp8Format, IntFormat
from compressor.quant.fp8 import fp8_dequantize, fp8_quantize
from compressor.quant.packing import pack_int32
from compressor.quant.rtn import rtn_quantize
from compressor.runtime import _ext
from compressor.runtime.ops import dequantize_packed, packed_matmul
from compressor.runtime.repack import PackedWeight, kernel_scale_dtype, repack_fp8, repack_int

if os.environ.get("COMPRESSOR_NO_EXT") == "1":
    pytest.skip("extension disabled by COMPRESSOR_NO_EXT=1", allow_module_level=True)
assert _ext.extension_available(), "compressor._C is not built: run `pip install -e .` (or set COMPRESSOR_NO_EXT=1)"

ISAS = _ext.available_isas()
Q8, GEMV, GEMM = 2, 3, 4  # op modes: int8-activation GEMV, float32 GEMV, blocked float32 GEMM
FLOAT_TOL = 2e-5  # float32 accumulation: error relative to max |y|
ACT_QUANT_TOL = 2e-5  # int8-activation path against a float reference that uses the same quantized activations


@pytest.fixture
def isa():
    previous = _ext.current_isa()
    yield _ext.set_isa
    _ext.set_isa(previous)


def _int_case(bits: int, n: int, k: int, group: int | None, symmetric: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    q, scale, zero = rtn_quantize(w, IntFormat(bits, group, symmetric), "float16")
    packed = pack_int32(q, bits)
    zp = None if zero is None else pack_int32(zero.to(torch.int8).t().contiguous(), bits).t().contiguous()
    scale = scale.to(torch.float16)
    weight = dequantize_packed(packed, scale, zp, bits, (n, k), group or k)
    return repack_int(packed, scale, zp, bits, (n, k), group or k), weight


def _act_block(k: int, group: int | None) -> int | None:
    if group is None or group >= k:
        return 128
    return next((b for b in (128, 64, 32) if group % b == 0), None)


def _fake_quant_act(x: torch.Tensor, block: int) -> torch.Tensor:
    """x with each block of `block` columns rounded to int8 codes of that block's absmax / 127 (float reference)."""
    m, k = x.shape
    pad = (-k) % block
    xb = torch.nn.functional.pad(x, (0, pad)).reshape(m, -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    scale = amax / 127
    q = torch.where(amax > 0, torch.round(xb * (127 / amax)), torch.zeros_like(xb))
    return (q * scale).reshape(m, -1)[:, :k]


def _relerr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _all_paths(isa, x, p, modes):
    out = {}
    for name in ISAS:
        isa(name)
        for mode in modes:
            out[name, mode] = packed_matmul(x, p, mode)
    return out


@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("group", [12, 16, 32, 40, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_int_kernels_match_scalar_and_float_reference(bits, symmetric, group, m, isa):
    n, k = 72, 200  # neither a multiple of 64; groups 12/16/32/64/128 leave a ragged last group
    p, weight = _int_case(bits, n, k, group, symmetric)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    block = _act_block(k, group)
    out = _all_paths(isa, x, p, [GEMV, GEMM, Q8])
    ref = x.double() @ weight.double().t()
    for (name, mode), y in out.items():
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert torch.equal(y, out["scalar", mode]), (name, mode)
        if mode == Q8 and not block:  # group not a multiple of 32: int8 activations fall back to float32
            assert torch.equal(y, out[name, GEMV if m < 16 else GEMM]), (name, mode)
        elif mode == Q8:
            ref_q = _fake_quant_act(x, block).double() @ weight.double().t()
            assert _relerr(y, ref_q) < ACT_QUANT_TOL, (name, mode)
            assert _relerr(y, ref) < 2e-2, (name, mode)  # int8 activations: ~0.5% of max |y|
        else:
            assert _relerr(y, ref) < FLOAT_TOL, (name, mode)


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_weights_have_no_zero_point_rows(bits, m, isa):
    """Symmetric weights repack without z * s rows (one stream less to read). With float activations the kernels'
    zoff * s equals the stored rows of the same weights given explicit zero points of 0, bit for bit, on every path;
    so do int8 activations with INT8 weights (offset 0). With int8 activations, symmetric INT4 takes its offset off
    the exact integer block sums instead (sum (u - 8) q): the same on every path, and closer to the float result
    than the explicit rows' float term, which cancels a large sum of u * x."""
    n, k, group = 40, 256, 64
    p, weight = _int_case(bits, n, k, group, symmetric=True)
    assert p.zs is None
    zero = torch.zeros(n, k // group, dtype=torch.int8)
    zp = pack_int32(zero.t().contiguous(), bits).t().contiguous()
    q, scale, _ = rtn_quantize(
        torch.randn(n, k, generator=torch.Generator().manual_seed(0)), IntFormat(bits, group, True), "float16"
    )
    explicit = repack_int(pack_int32(q, bits), scale.to(torch.float16), zp, bits, (n, k), group)
    assert explicit.zs is not None and torch.equal(explicit.w, p.w) and torch.equal(explicit.scale, p.scale)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    a, b = _all_paths(isa, x, p, [GEMV, GEMM, Q8]), _all_paths(isa, x, explicit, [GEMV, GEMM, Q8])
    ref_q = _fake_quant_act(x, _act_block(k, group)).double() @ weight.double().t()
    for (name, mode), y in a.items():
        if mode == Q8 and bits == 4:
            assert torch.equal(y, a["scalar", Q8]), name
            assert _relerr(y, ref_q) < _relerr(b[name, mode], ref_q) < ACT_QUANT_TOL, name
        else:
            assert torch.equal(y, b[name, mode]), (name, mode)


def test_scales_keep_the_narrowest_exact_storage():
    """Repacked scales are float16 / bfloat16 when that holds every value exactly (half the scale bytes a GEMV
    reads), float32 otherwise."""
    fp16_exact = torch.tensor([0.5, 3.0e-3, 2.0**-20, 6.0e4]).to(torch.float16).float()  # a float16 subnormal too
    bf16_only = torch.tensor([2.0**-30, 1.0e8]).to(torch.bfloat16).float()  # outside float16's range
    assert kernel_scale_dtype(fp16_exact) == torch.float16
    assert kernel_scale_dtype(bf16_only) == torch.bfloat16
    assert kernel_scale_dtype(torch.tensor([0.1, 1 / 3])) == torch.float32
    assert kernel_scale_dtype(torch.tensor([0.1]).to(torch.bfloat16)) == torch.bfloat16
    assert kernel_scale_dtype(torch.tensor([float("nan")])) == torch.float32
    p, _ = _int_case(4, 40, 256, 64, symmetric=False)  # artifact scales are float16
    assert p.scale.dtype == torch.float16 and p.zs is not None and p.zs.dtype == torch.float32


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_16bit_scales_give_the_float32_results(bits, symmetric, storage, m, isa):
    """The same scale values stored as 16-bit floats or widened to float32 give bit-identical outputs on every
    path and mode: the kernels widen 16-bit scales exactly (float16 subnormals and bfloat16 values outside float16's
    range included)."""
    n, k, group = 72, 200, 64
    p, weight = _int_case(bits, n, k, group, symmetric, seed=6)
    scale = p.scale.float()
    scale[:, ::7] *= 2.0**-12 if storage == torch.float16 else 2.0**-40  # subnormal in float16 / outside its range
    narrow = dataclasses.replace(p, scale=scale.to(storage))
    wide = dataclasses.replace(p, scale=narrow.scale.float())
    tiny = narrow.scale.float().abs()
    tiny = tiny[(tiny > 0) & (tiny < (2.0**-14 if storage == torch.float16 else 2.0**-24))]
    assert narrow.scale.dtype == storage and tiny.numel() > 0
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7))
    a, b = _all_paths(isa, x, narrow, [GEMV, GEMM, Q8]), _all_paths(isa, x, wide, [GEMV, GEMM, Q8])
    for key in a:
        assert torch.equal(a[key], b[key]), key
    fp8 = _fp8_case(n, k, Fp8Format("block", (32, 64)))[0]
    fp8_narrow = dataclasses.replace(fp8, scale=fp8.scale.to(storage))
    fp8_wide = dataclasses.replace(fp8, scale=fp8_narrow.scale.float())
    a, b = _all_paths(isa, x, fp8_narrow, [GEMV, GEMM]), _all_paths(isa, x, fp8_wide, [GEMV, GEMM])
    for key in a:
        assert torch.equal(a[key], b[key]), ("fp8",) + key


def test_ops_reject_float64_scales():
    p, _ = _int_case(4, 40, 256, 64, symmetric=True)
    with pytest.raises(RuntimeError, match="scales must be float32, float16 or bfloat16"):
        packed_matmul(torch.randn(1, 256), dataclasses.replace(p, scale=p.scale.double()))


@pytest.mark.parametrize("m", [16, 18, 31, 48, 80])
@pytest.mark.parametrize("group", [32, 64, None])
@pytest.mark.parametrize("bits", [4, 8])
def test_int8_activation_gemm_tile_shapes(bits, group, m, isa):
    """M >= 16 with int8 activations (AMX tiles where the CPU has them, else 4-row register blocks): one and
    several 16-row activation tiles with a ragged last one, 4-row blocks with 1-3 rows left over, an odd number of
    16-row weight pairs, and K = 1088, whose last 128-column activation block is half full."""
    n, k = 200, 1088
    p, weight = _int_case(bits, n, k, group, False, seed=4)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5))
    out = _all_paths(isa, x, p, [Q8])
    ref_q = _fake_quant_act(x, _act_block(k, group)).double() @ weight.double().t()
    for (name, mode), y in out.items():
        assert torch.equal(y, out["scalar", mode]), name
        assert _relerr(y, ref_q) < ACT_QUANT_TOL, name


def test_read_memory_xors_every_word(isa):
    buf = torch.randint(-(2**62), 2**62, (4096 + 32,), dtype=torch.int64, generator=torch.Generator().manual_seed(6))
    expected = 0
    for v in buf.tolist():
        expected ^= v
    for name in ISAS:
        isa(name)
        assert torch.ops.compressor.read_memory(buf) == expected, name


@pytest.mark.parametrize("m", [1, 17])
def test_bfloat16_and_float16_activations(m, isa):
    p, weight = _int_case(4, 40, 96, 32, True)
    x = torch.randn(m, 96).to(torch.bfloat16)
    for name in ISAS:
        isa(name)
        for dtype in (torch.bfloat16, torch.float16):
            xd = x.to(dtype)
            assert torch.equal(packed_matmul(xd, p, GEMV), packed_matmul(xd.float(), p, GEMV))
            assert torch.equal(packed_matmul(xd, p, Q8), packed_matmul(xd.float(), p, Q8))


def test_thread_count_does_not_change_results():
    """Every thread count gives the same output: each worker owns a share of the weight streams and the others take
    what is left of it from its back end (more workers than cores: shares are taken over while their owner waits
    for a core), 1 to 5 workers, a width whose shares are not whole streams (1000 rows: 63 pairs)."""
    threads = torch.get_num_threads()
    try:
        for n in (264, 1000):
            p, _ = _int_case(4, n, 256, 64, False)
            x = torch.randn(5, 256)
            outs = []
            for count in (1, 2, 3, 5):
                torch.set_num_threads(count)
                outs.append([packed_matmul(x, p, mode) for mode in (Q8, GEMV, GEMM)])
            assert all(torch.equal(a, b) for other in outs[1:] for a, b in zip(outs[0], other)), n
        buf = torch.arange(1 << 16, dtype=torch.int32)
        sums = set()
        for count in (1, 2, 3, 5):
            torch.set_num_threads(count)
            sums.add(torch.ops.compressor.read_memory(buf[: 64 * 37]))
        assert len(sums) == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("m", [1, 17])
def test_output_does_not_depend_on_reused_memory(m, isa):
    """The output is allocated uninitialised and each worker zeroes its own chunk: a block that held NaNs before
    (the allocator hands the same block back for the same size) must not leak into any path's result."""
    p, _ = _int_case(4, 264, 256, 64, False)
    x = torch.randn(m, 256)
    padded_n = p.scale.shape[1]  # the kernel's y is [m, Np]
    for name in ISAS:
        isa(name)
        for mode in (Q8, GEMV, GEMM):
            ref = packed_matmul(x, p, mode).clone()
            for _ in range(3):
                junk = torch.full((m, padded_n), float("nan"))
                del junk
                assert torch.equal(packed_matmul(x, p, mode), ref), (name, mode)


def test_ops_take_inputs_that_require_grad():
    """The ops have no derivative; their autograd keys fall through to the kernels, so an input that requires grad
    gives the same values and an output outside the graph."""
    p, _ = _int_case(4, 40, 96, 32, True)
    x = torch.randn(3, 96)
    y = packed_matmul(x.clone().requires_grad_(), p, GEMV)
    assert not y.requires_grad
    assert torch.equal(y, packed_matmul(x, p, GEMV))


@pytest.mark.parametrize("k", [203, 61])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("bits", [4, 8])
def test_int8_activations_with_k_not_a_multiple_of_8(bits, m, k, isa):
    """The SIMD activation quantizers load a block's last columns with a mask (K = 203: 75 columns in the last
    128-column block, 3 in its last 8); codes, scales and sums must equal the scalar loop's, bit for bit."""
    p, weight = _int_case(bits, 40, k, None, symmetric=bits == 4, seed=9)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(10)) * 3
    out = _all_paths(isa, x, p, [Q8])
    ref_q = _fake_quant_act(x, 128).double() @ weight.double().t()
    for (name, mode), y in out.items():
        assert torch.equal(y, out["scalar", mode]), name
        assert _relerr(y, ref_q) < ACT_QUANT_TOL, name


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("bits", [4, 8])
def test_wide_layer_every_row_once(bits, m, isa):
    """2056 rows, padded to 33 streams of 4 tile pairs: the guided work chunks (8, then 4 pairs) cover every row
    exactly once on 1 and 2 threads; the scalar path shares the chunking, so the check is against float references."""
    n, k, group = 129 * 16 - 8, 256, 64  # the last stream's last pair half full, its other pairs padding
    p, weight = _int_case(bits, n, k, group, False, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(8))
    ref, ref_q = x.double() @ weight.double().t(), _fake_quant_act(x, 64).double() @ weight.double().t()
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            for (name, mode), y in _all_paths(isa, x, p, [GEMV, GEMM, Q8]).items():
                assert _relerr(y, ref_q if mode == Q8 else ref) < FLOAT_TOL, (name, mode, num_threads)
    finally:
        torch.set_num_threads(threads)


def _fp8_case(n: int, k: int, fmt: Fp8Format):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    q, scale = fp8_quantize(w, fmt)
    return repack_fp8(q, scale, fmt.strategy, fmt.block), fp8_dequantize(q, scale, fmt)


@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize(
    "fmt", [Fp8Format("tensor"), Fp8Format("channel"), Fp8Format("block", (128, 128)), Fp8Format("block", (32, 64))]
)
def test_fp8_kernels_match_scalar_and_float_reference(fmt, m, isa):
    n, k = 150, 300
    p, weight = _fp8_case(n, k, fmt)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    out = _all_paths(isa, x, p, [GEMV, GEMM])
    ref = x.double() @ weight.double().t()
    for (name, mode), y in out.items():
        assert torch.equal(y, out["scalar", mode]), (name, mode)
        assert _relerr(y, ref) < FLOAT_TOL, (name, mode)


def test_fp8_decode_matches_torch_casts_for_every_byte(isa):
    """Row r of W holds all 256 E4M3 bytes (NaNs zeroed); x = identity, so y[k, r] is the decoded byte k."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaN encodings
    w = codes.view(torch.float8_e4m3fn).reshape(1, 256).repeat(16, 1)
    p = repack_fp8(w, torch.ones(1), "tensor", (128, 128))
    expected = w.to(torch.float32).t()
    for name in ISAS:
        isa(name)
        for mode in (GEMV, GEMM):
            assert torch.equal(packed_matmul(torch.eye(256), p, mode), expected), (name, mode)


@pytest.mark.parametrize("name", ["scalar", "avx2", "avx512", "amx", "sse9"])
def test_compressor_isa_environment_forces_a_path(name):
    code = "import torch, compressor._C; print(torch.ops.compressor.isa())"
    env = {**os.environ, "COMPRESSOR_ISA": name}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if name in ISAS:
        assert run.returncode == 0 and run.stdout.strip() == name
    else:  # unknown, or not supported by this CPU: one clear error naming the available paths
        assert run.returncode != 0 and f"COMPRESSOR_ISA={name} is not available" in run.stderr
        assert "available: " + ", ".join(ISAS) in run.stderr


def test_set_isa_works_as_the_first_call():
    """`_ext.set_isa` loads the extension itself (it used to need an op call first: 'no attribute set_isa')."""
    code = "from compressor.runtime import _ext; print(_ext.set_isa('scalar'), _ext.current_isa())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [_ext.current_isa() if "COMPRESSOR_ISA" in os.environ else ISAS[-1], "scalar"]


@pytest.mark.parametrize("m", [1, 17])
def test_ops_trace_under_torch_compile(m):
    """The GEMM ops have fake (shape-only) kernels: torch.compile traces them in one graph, and the fake result has
    the real one's shape and strides (an [M, N] view of [M, Np] when N is not a multiple of 64)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(m, 200, generator=torch.Generator().manual_seed(4))
    int4, _ = _int_case(4, 72, 200, 32, False)
    int8, _ = _int_case(8, 64, 200, 64, True)
    fp8, _ = _fp8_case(72, 200, Fp8Format("channel"))
    for p in (int4, int8, fp8):
        y = packed_matmul(x, p)
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, p=p: packed_matmul(x, p) * 2, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), y * 2), p.kind
        with FakeTensorMode() as mode:
            fake = packed_matmul(mode.from_tensor(x), _map_tensors(p, mode.from_tensor))
        assert fake.shape == y.shape and fake.stride() == y.stride() and fake.dtype == y.dtype, p.kind


def _map_tensors(p: PackedWeight, fn) -> PackedWeight:
    return dataclasses.replace(p, w=fn(p.w), scale=fn(p.scale), zs=None if p.zs is None else fn(p.zs))


# ---- CUDA (csrc/cuda/kernels.cu) -------------------------------------------------------------------------------
# Our machines have no GPU: these run only where torch sees a CUDA device and the extension was built against a
# CUDA torch (setup.py adds the .cu sources then). The GEMV (M < 16) multiplies and sums in float32; the GEMM
# (M >= 16) runs WMMA on x and the dequantized W rounded to fp16 (bf16 for bfloat16 x) with float32 sums, so it is
# checked tightly against a reference with the same rounded operands and loosely against the float32 one.

CUDA = torch.cuda.is_available() and _ext.kernels_for(torch.device("cuda"))
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the extension built against a CUDA torch")
CUDA_MMA_TOL = 1e-4  # against the same fp16 / bf16 operands (float32 sums in another order)
CUDA_ROUNDED_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # against float32 operands (measured: 4.3e-4, 2.4e-3)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _on_cuda(p: PackedWeight) -> PackedWeight:
    return _map_tensors(p, torch.Tensor.cuda)


def _check_cuda(x: torch.Tensor, p: PackedWeight, weight: torch.Tensor) -> None:
    """The CUDA op on x (CPU tensor, moved) and p against float references of the dequantized weight."""
    y = packed_matmul(x.cuda(), _on_cuda(p))
    assert y.is_cuda and y.dtype == torch.float32 and y.shape == (x.shape[0], weight.shape[0])
    y, ref = y.cpu(), x.double() @ weight.double().t()
    if x.shape[0] < 16:
        assert _relerr(y, ref) < FLOAT_TOL
        return
    mma = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float16
    assert _relerr(y, x.to(mma).double() @ weight.to(mma).double().t()) < CUDA_MMA_TOL
    assert _relerr(y, ref) < CUDA_ROUNDED_TOL[mma]


@pytest.mark.parametrize("bits", [4, 8])
def test_repack_and_dequantize_stay_on_the_weights_device(bits):
    """What model.to("cuda") runs before the CUDA ops (repack, and the fallback's dequantization), on the meta device,
    where any CPU tensor mixed in raises: so it runs on this machine too."""
    n, k, group = 72, 200, 32
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    zeros = torch.randint(-8, 8, (k // group + 1, n), dtype=torch.int8)  # [G, N], packed along N as on disk
    packed, zp = pack_int32(codes, bits).to("meta"), pack_int32(zeros, bits).t().contiguous().to("meta")
    scale = torch.rand(n, k // group + 1).half().to("meta")
    p = repack_int(packed, scale, zp, bits, (n, k), group)
    assert {t.device.type for t in (p.w, p.scale, p.zs)} == {"meta"}
    assert dequantize_packed(packed, scale, zp, bits, (n, k), group).device.type == "meta"
    q, s = fp8_quantize(torch.randn(n, k), Fp8Format("block", (32, 64)))
    p = repack_fp8(q.to("meta"), s.half().to("meta"), "block", (32, 64))  # 16-bit scales: no data-dependent check
    assert {t.device.type for t in (p.w, p.scale)} == {"meta"}


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("group", [12, 16, 32, 40, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_int_kernels_match_float_references(bits, symmetric, group, m, dtype):
    p, weight = _int_case(bits, 72, 200, group, symmetric)  # N, K not multiples of 64, ragged last groups
    _check_cuda(torch.randn(m, 200, generator=torch.Generator().manual_seed(1)).to(dtype), p, weight)


@needs_cuda
@pytest.mark.parametrize("m", [1, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_wide_layer(bits, m):
    """2056 rows (33 streams, the last one mostly padding): many GEMV blocks and GEMM tiles, every row written."""
    p, weight = _int_case(bits, 129 * 16 - 8, 256, 64, False, seed=7)
    _check_cuda(torch.randn(m, 256, generator=torch.Generator().manual_seed(8)), p, weight)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize(
    "fmt", [Fp8Format("tensor"), Fp8Format("channel"), Fp8Format("block", (128, 128)), Fp8Format("block", (32, 64))]
)
def test_cuda_fp8_kernels_match_float_references(fmt, m, dtype):
    p, weight = _fp8_case(150, 300, fmt)
    _check_cuda(torch.randn(m, 300, generator=torch.Generator().manual_seed(3)).to(dtype), p, weight)


@needs_cuda
def test_cuda_fp8_decode_matches_torch_casts_for_every_byte():
    """As on CPU: row r of W holds all 256 E4M3 bytes, x = identity rows (every E4M3 value is exact in fp16 and
    bf16, so the tensor-core GEMM is exact too)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0
    w = codes.view(torch.float8_e4m3fn).reshape(1, 256).repeat(16, 1)
    p = _on_cuda(repack_fp8(w, torch.ones(1), "tensor", (128, 128)))
    expected = w.to(torch.float32).t()
    eye = torch.eye(256)
    for dtype in DTYPES:
        assert torch.equal(packed_matmul(eye.to(dtype).cuda(), p).cpu(), expected), dtype  # GEMM
        gemv = torch.cat([packed_matmul(eye[r : r + 8].to(dtype).cuda(), p).cpu() for r in range(0, 256, 8)])
        assert torch.equal(gemv, expected), dtype


@needs_cuda
def test_cuda_op_rejects_inputs_on_two_devices():
    p, _ = _int_case(4, 72, 200, 32, True)
    with pytest.raises(RuntimeError, match="same CUDA device"):
        packed_matmul(torch.randn(1, 200), _on_cuda(p))
