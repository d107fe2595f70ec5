"""Dense 16-bit weights (`torch.ops.compressor.dense16_gemm`, runtime/dense16.py): every ISA path of this machine
against the scalar reference (bit-exact) and against torch's float32 matmul of the widened weight; exact widening of
every finite bfloat16 / float16 value; Linear16 / Embedding16 modules; compressor.load of artifacts whose
unquantized tensors are bfloat16 (tied and untied heads) against the float32 upcast of the same artifact."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import small_recipe
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

import compressor
from compressor.runtime import _ext
from compressor.runtime.dense16 import Embedding16, Linear16, TiedLinear16

if os.environ.get("COMPRESSOR_NO_EXT") == "1":
    pytest.skip("extension disabled by COMPRESSOR_NO_EXT=1", allow_module_level=True)
assert _ext.extension_available(), "compressor._C is not built: run `pip install -e .` (or set COMPRESSOR_NO_EXT=1)"

ISAS = _ext.available_isas()
HALVES = [torch.bfloat16, torch.float16]
FLOAT_TOL = 2e-5  # float32 accumulation in another summation order: error relative to max |y|
TOL = dict(rtol=1e-4, atol=1e-4)  # compressor.load against transformers' float32 load of the same artifact


@pytest.fixture
def isa():
    previous = _ext.current_isa()
    yield _ext.set_isa
    _ext.set_isa(previous)


def _case(m: int, k: int, n: int, half: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(half)
    return torch.randn(m, k, generator=gen), w, torch.randn(n, generator=gen)


def _relerr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _per_isa(isa, x, w, bias) -> dict[str, torch.Tensor]:
    out = {}
    for name in ISAS:
        isa(name)
        out[name] = torch.ops.compressor.dense16_gemm(x, w, bias)
    return out


@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("k, n", [(203, 45), (300, 133), (16, 7), (5, 70)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_every_isa_matches_scalar_and_float32_matmul(isa, half, m, k, n, with_bias, xdtype):
    """K and N off every vector width (K = 300: two K blocks of the GEMM, a masked last step), the GEMV (M < 4) and
    the register-tiled GEMM with ragged row tiles; bit-exact across ISAs, float32 matmul to summation order."""
    x, w, bias = _case(m, k, n, half)
    x = x.to(xdtype)
    bias = bias if with_bias else None
    out = _per_isa(isa, x, w, bias)
    reference = F.linear(x.float(), w.float(), bias)
    for name, y in out.items():
        assert y.dtype == torch.float32 and y.shape == (m, n)
        assert torch.equal(y, out["scalar"]), name
        assert _relerr(y, reference) < FLOAT_TOL, name


@pytest.mark.parametrize("half", HALVES)
def test_rows_do_not_depend_on_m_or_threads(isa, half):
    """One summation order for every M (GEMV and GEMM paths) and thread count: row 0 of a 128-row product is the
    1-row product; a 1000-row weight (several chunks per worker, stolen shares) gives the same on 1 and 2 threads."""
    x, w, bias = _case(128, 576, 1000, half, seed=1)
    threads = torch.get_num_threads()
    for name in ISAS:
        isa(name)
        full = torch.ops.compressor.dense16_gemm(x, w, bias)
        for m in (1, 3, 4, 5):
            assert torch.equal(torch.ops.compressor.dense16_gemm(x[:m], w, bias), full[:m]), (name, m)
        try:
            torch.set_num_threads(1)
            alone = torch.ops.compressor.dense16_gemm(x, w, bias)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(alone, full), name


@pytest.mark.parametrize("half", HALVES)
def test_every_finite_16bit_value_is_widened_exactly(isa, half):
    """x = identity: y[m][n] = w[n][m] (one product and zeros), for all finite bit patterns (subnormals, float16's
    largest values, bfloat16 values outside float16's range), on every ISA."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    w = bits.view(half)
    w = w[torch.isfinite(w)]
    k = 128
    w = torch.cat([w, w.new_zeros((-len(w)) % k)]).reshape(-1, k)
    for name, y in _per_isa(isa, torch.eye(k), w, None).items():
        assert torch.equal(y.t(), w.float()), name


def test_masked_tail_reads_no_neighbouring_memory(isa):
    """The last 16-column step of a row loads its weights masked: NaN just past the last row (and in the padding of
    odd K) does not reach the output."""
    n, k = 37, 21
    buf = torch.full((n * k + 64,), float("nan"), dtype=torch.bfloat16)
    buf[: n * k] = torch.randn(n * k).to(torch.bfloat16)
    w = buf[: n * k].view(n, k)
    x = torch.randn(3, k)
    for name, y in _per_isa(isa, x, w, None).items():
        assert torch.isfinite(y).all(), name
        assert _relerr(y, x @ w.float().t()) < FLOAT_TOL, name


def test_argument_errors():
    x, w, _ = _case(2, 16, 8, torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        torch.ops.compressor.dense16_gemm(x, w.float(), None)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.compressor.dense16_gemm(x[:, :8], w, None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.compressor.dense16_gemm(x, w, torch.zeros(3))
    assert torch.ops.compressor.dense16_gemm(x[:0], w, None).shape == (0, 8)


# ---- modules ------------------------------------------------------------------------------------------------


def _float_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    found = [t for t in module.__dict__.values() if isinstance(t, torch.Tensor)]
    return found + list(module.parameters()) + list(module.buffers())


@pytest.mark.parametrize("half", HALVES)
def test_linear16_module(half):
    """Linear16 keeps the 16-bit weight only (no float32 copy), returns x's dtype, and follows conversions like a
    QuantLinear: .to(dtype) converts the bias, the weight keeps its dtype."""
    x, w, bias = _case(6, 96, 50, half)
    layer = Linear16(w, bias)
    assert layer.weight.dtype == half and layer.weight.data_ptr() == w.data_ptr()
    assert all(t.numel() < w.numel() for t in _float_tensors(layer) if t.dtype == torch.float32)
    y = layer(x.reshape(2, 3, 96))
    assert y.shape == (2, 3, 50) and y.dtype == torch.float32
    reference = F.linear(x, w.float(), bias).reshape(2, 3, 50)
    assert _relerr(y, reference) < FLOAT_TOL
    layer.use_kernels = False  # the torch path: exactly the upcast weight's matmul
    torch.testing.assert_close(layer(x.reshape(2, 3, 96)), reference, rtol=0, atol=0)
    layer.use_kernels = True
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == half and layer.bias.dtype == torch.bfloat16
    got = layer(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference.reshape(6, 50), rtol=2e-2, atol=2e-2)


def test_linear16_compiles_in_one_graph():
    x, w, bias = _case(5, 40, 24, torch.bfloat16)
    layer = Linear16(w, bias)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, backend="aot_eager")(x), layer(x))


def test_tied_head_reads_the_embedding_table():
    """TiedLinear16 has no tensor of its own: it reads the Embedding16's table, also after a move."""
    table = torch.randn(70, 32).to(torch.bfloat16)
    embed = Embedding16(table, embed_scale=2.0)
    head = TiedLinear16(embed)
    ids = torch.tensor([[3, 69, 0]])
    rows = embed(ids)
    assert rows.dtype == torch.float32 and torch.equal(rows, table[ids].float() * 2.0)
    assert head.weight is embed.weight and not list(head.buffers())
    x = torch.randn(4, 32)
    assert _relerr(head(x), x @ table.float().t()) < FLOAT_TOL
    torch.nn.ModuleDict({"embed": embed, "head": head}).to(torch.float16)
    assert head.weight is embed.weight and embed.weight.dtype == torch.bfloat16
    assert embed(ids).dtype == torch.float16


# ---- compressor.load ----------------------------------------------------------------------------------------

E2E = ["llama", "llama-untied", "gemma3", "bert"]


@pytest.fixture(scope="module")
def bf16_artifact(tiny_model_dir, calib_file, tmp_path_factory):
    """Factory: a W4 artifact of a tiny model written with `dtype: bfloat16` (cached per module)."""
    cache = {}

    def make(case: str):
        if case not in cache:
            family = case.removesuffix("-untied")
            src = tiny_model_dir(family)
            if case.endswith("-untied"):  # the tied tiny llama with a head of its own
                src = tmp_path_factory.mktemp(f"src-{case}")
                config = AutoConfig.from_pretrained(tiny_model_dir(family), tie_word_embeddings=False)
                model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), config=config)
                with torch.no_grad():
                    model.lm_head.weight.copy_(model.get_input_embeddings().weight * 0.5)
                model.save_pretrained(src)
                for f in tiny_model_dir(family).glob("tokenizer*"):
                    (src / f.name).write_bytes(f.read_bytes())
            out = tmp_path_factory.mktemp(f"bf16-{case}") / "out"
            compressor.compress(small_recipe(calib_file, dtype="bfloat16"), model=str(src), output=out, quiet=True)
            cache[case] = out
        return cache[case]

    return make


def _logits(model, vocab: int = 300) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", E2E)
def test_load_keeps_16bit_float_linears(bf16_artifact, case):
    """The float head of a bfloat16 artifact runs from its 16-bit storage (tied: the embedding's table, one copy),
    with the logits of the float32 upcast (keep_16bit=False) to summation-order rounding, and exactly those when
    the modules take the torch path."""
    out = bf16_artifact(case)
    ours, upcast = compressor.load(out), compressor.load(out, keep_16bit=False)
    head, embed = ours.get_output_embeddings(), ours.get_input_embeddings()
    if case == "bert":  # the decoder's bias is tied to cls.predictions.bias: transformers ties it, as before
        assert type(head) is torch.nn.Linear and type(embed) is torch.nn.Embedding
        assert type(ours.cls.predictions.transform.dense) is Linear16
    elif case.endswith("-untied"):
        assert type(head) is Linear16 and head.weight.dtype == torch.bfloat16
        assert type(embed) is torch.nn.Embedding and embed.weight.dtype == torch.float32
    else:
        assert type(head) is TiedLinear16 and type(embed) is Embedding16
        assert head.weight is embed.weight and head.weight.dtype == torch.bfloat16
        assert "lm_head.weight" not in ours.state_dict()
    assert not any(type(m) is Linear16 for m in upcast.modules())
    sixteen = [m for m in ours.modules() if isinstance(m, (Linear16, Embedding16))]
    assert sixteen and all(t.dtype != torch.float32 for m in sixteen for t in m.buffers())
    reference = _logits(upcast)
    got = _logits(ours)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    for m in ours.modules():
        if isinstance(m, Linear16):
            m.use_kernels = False
    assert torch.equal(_logits(ours), reference)
    transformers_cls = AutoModelForMaskedLM if case == "bert" else AutoModelForCausalLM
    torch.testing.assert_close(got, _logits(transformers_cls.from_pretrained(out, dtype=torch.float32)), **TOL)


def test_load_in_16bit_dtype_keeps_plain_linears(bf16_artifact):
    """A bfloat16 model (load(dtype=torch.bfloat16)) runs its float layers as nn.Linear, as before."""
    model = compressor.load(bf16_artifact("llama"), dtype=torch.bfloat16)
    assert not any(isinstance(m, (Linear16, Embedding16)) for m in model.modules())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_loaded_model_converts_and_stays_tied(bf16_artifact):
    """.to(torch.bfloat16) on a loaded model keeps the 16-bit table shared and runs close to the float32 logits."""
    model = compressor.load(bf16_artifact("llama"))
    reference = _logits(model)
    model.to(torch.bfloat16)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embed.weight and head.weight.dtype == torch.bfloat16
    got = _logits(model)
    assert got.dtype == torch.bfloat16
    assert _relerr(got.float(), reference) < 0.05
