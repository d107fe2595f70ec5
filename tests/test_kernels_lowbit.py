"""INT2 / INT3 weight kernels (torch.ops.compressor.int2_gemm / int3_gemm): every ISA path of this machine against
the scalar reference (bit-exact) and the scalar reference against dequantize-then-matmul, as for INT4 in
test_kernels.py, whose helpers these tests share."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_kernels import (
    ACT_QUANT_TOL,
    FLOAT_TOL,
    GEMM,
    GEMV,
    ISAS,
    Q8,
    _act_block,
    _all_paths,
    _check_cuda,
    _fake_quant_act,
    _int_case,
    _map_tensors,
    _relerr,
    needs_cuda,
)

from compressor.quant.packing import pack_int32, unpack_int32
from compressor.runtime import _ext
from compressor.runtime.ops import MODE_AUTO, MODE_FLOAT, dequantize_packed, packed_matmul
from compressor.runtime.repack import repack_int

BITS = [2, 3]


def _check_paths(x, p, weight, group, modes=(GEMV, GEMM, Q8)):
    """Every ISA and mode equals the scalar reference bit for bit; the scalar reference is within the float
    tolerances of the dequantized weight's matmul (int8 activations: of the same quantized activations)."""
    m, k = x.shape
    block = _act_block(k, group)
    out = _paths(x, p, modes)
    ref = x.double() @ weight.double().t()
    for (name, mode), y in out.items():
        assert y.shape == (m, p.out_features) and y.dtype == torch.float32
        assert torch.equal(y, out["scalar", mode]), (name, mode)
        if mode == Q8 and not block:  # group not a multiple of 32: int8 activations fall back to float32
            assert torch.equal(y, out[name, GEMV if m < 16 else GEMM]), (name, mode)
        elif mode == Q8:
            assert _relerr(y, _fake_quant_act(x, block).double() @ weight.double().t()) < ACT_QUANT_TOL, (name, mode)
        else:
            assert _relerr(y, ref) < FLOAT_TOL, (name, mode)
    return out


@pytest.fixture(autouse=True)
def restore_isa():
    previous = _ext.current_isa()
    yield
    _ext.set_isa(previous)


def _paths(x, p, modes):
    """{(isa, mode): output} over every ISA of this machine (the fixture restores the ISA)."""
    return _all_paths(_ext.set_isa, x, p, modes)


@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("group", [32, 40, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_lowbit_kernels_match_scalar_and_float_reference(bits, symmetric, group, m):
    """N = 72, K = 200: neither a multiple of 64 (padded rows and columns); groups 32/64/128 leave a ragged last
    group, 40 is not a multiple of the word block (scalar kernels, float activations)."""
    p, weight = _int_case(bits, 72, 200, group, symmetric)
    assert p.kind == f"int{bits}" and (p.zs is None) == symmetric
    x = torch.randn(m, 200, generator=torch.Generator().manual_seed(1))
    out = _check_paths(x, p, weight, group)
    # the user-facing modes: float (every M) and auto (int8 activations below M = 16, float from 16)
    user = _paths(x, p, [MODE_AUTO, MODE_FLOAT])
    float_mode = GEMV if m < 16 else GEMM
    for name in ISAS:
        assert torch.equal(user[name, MODE_FLOAT], out[name, float_mode]), name
        expected = out[name, Q8] if m < 16 and _act_block(200, group) else out[name, float_mode]
        assert torch.equal(user[name, MODE_AUTO], expected), name


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_lowbit_scale_storage(bits, symmetric, storage, m):
    """Scales stored as float32, float16 (subnormals included) or bfloat16 (values outside float16's range): every
    path equals the scalar reference and the same values widened to float32, bit for bit."""
    p, _ = _int_case(bits, 72, 200, 64, symmetric, seed=6)
    scale = p.scale.float()
    if storage != torch.float32:
        scale[:, ::7] *= 2.0**-12 if storage == torch.float16 else 2.0**-40
    narrow = dataclasses.replace(p, scale=scale.to(storage))
    wide = dataclasses.replace(p, scale=narrow.scale.float())
    x = torch.randn(m, 200, generator=torch.Generator().manual_seed(7))
    a, b = _paths(x, narrow, [GEMV, GEMM, Q8]), _paths(x, wide, [GEMV, GEMM, Q8])
    for key in a:
        assert torch.equal(a[key], a["scalar", key[1]]), key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("m", [1, 16, 31])
@pytest.mark.parametrize("group", [32, None])
@pytest.mark.parametrize("bits", BITS)
def test_lowbit_many_streams_and_a_half_full_block(bits, group, m):
    """264 rows (5 streams, the last one mostly padding), K = 1088 (the last 128-column activation block half full),
    M across the GEMV / GEMM boundary."""
    p, weight = _int_case(bits, 264, 1088, group, False, seed=4)
    x = torch.randn(m, 1088, generator=torch.Generator().manual_seed(5))
    _check_paths(x, p, weight, group)


@pytest.mark.parametrize("k", [203, 61])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("bits", BITS)
def test_lowbit_int8_activations_with_k_not_a_multiple_of_16(bits, m, k):
    """The SIMD quantizers write int2 / int3's activation order 16 columns at a time; a block's last columns are
    loaded with a mask (K = 203: 75 columns in the last block, 11 in its last 16)."""
    p, weight = _int_case(bits, 40, k, None, symmetric=bits == 2, seed=9)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(10)) * 3
    _check_paths(x, p, weight, None, modes=(Q8,))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_lowbit_codes_cover_every_value(bits, symmetric):
    """Each code value in each column position of a word block (int3: every low-bit / high-bit placement): x = the
    identity, so y[k, n] is the dequantized weight W[n, k], equal to dequantize_packed's up to its rounding."""
    n, k = 64, 96
    codes = (torch.arange(n * k).reshape(n, k) * 7 // 3 % (1 << bits) - (1 << (bits - 1))).to(torch.int8)
    scale = torch.full((n, k // 32), 0.5, dtype=torch.float16)
    zp = None
    if not symmetric:
        zero = torch.arange(n * (k // 32)).reshape(k // 32, n) % (1 << bits) - (1 << (bits - 1))
        zp = pack_int32(zero.to(torch.int8), bits).t().contiguous()
    packed = pack_int32(codes, bits)
    assert torch.equal(unpack_int32(packed, bits, k), codes)
    p = repack_int(packed, scale, zp, bits, (n, k), 32)
    expected = dequantize_packed(packed, scale, zp, bits, (n, k), 32).t()
    for name, y in {key[0]: y for key, y in _paths(torch.eye(k), p, [GEMV]).items()}.items():
        assert torch.equal(y, expected), name  # small integers times 0.5: exact on every path


@pytest.mark.parametrize("bits", BITS)
def test_lowbit_repack_stays_on_the_weights_device(bits):
    n, k, group = 72, 200, 32
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8)
    zeros = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (k // group + 1, n), dtype=torch.int8)
    packed, zp = pack_int32(codes, bits).to("meta"), pack_int32(zeros, bits).t().contiguous().to("meta")
    p = repack_int(packed, torch.rand(n, k // group + 1).half().to("meta"), zp, bits, (n, k), group)
    assert {t.device.type for t in (p.w, p.scale, p.zs)} == {"meta"}
    assert p.w.shape == (2, 224 * bits // 32, 64)


@pytest.mark.parametrize("bits", BITS)
def test_lowbit_ops_trace_under_torch_compile(bits):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(4))
    p, _ = _int_case(bits, 72, 200, 32, False)
    y = packed_matmul(x, p)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: packed_matmul(x, p) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), y * 2)
    with FakeTensorMode() as mode:
        fake = packed_matmul(mode.from_tensor(x), _map_tensors(p, mode.from_tensor))
    assert fake.shape == y.shape and fake.stride() == y.stride() and fake.dtype == y.dtype


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("group", [32, 40, None])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_cuda_lowbit_kernels_match_float_references(bits, symmetric, group, m, dtype):
    p, weight = _int_case(bits, 72, 200, group, symmetric)
    _check_cuda(torch.randn(m, 200, generator=torch.Generator().manual_seed(1)).to(dtype), p, weight)
