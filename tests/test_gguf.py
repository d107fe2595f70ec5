"""GGUF export (issue #30, first part): Q4_0 / Q8_0 blocks written exactly from our codes, llama.cpp's names and
metadata per family, read back by transformers' GGUF reader (gguf's own dequantization) with our logits."""

from __future__ import annotations

import json
import os
import subprocess

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import small_recipe
from transformers import AutoConfig, AutoModelForCausalLM

import compressor
from compressor.cli import main
from compressor.errors import ModelError, RecipeError
from compressor.quant.formats import IntFormat
from compressor.quant.gguf import pack_q4_0, pack_q8_0
from compressor.quant.rtn import dequantize, rtn_quantize
from compressor.recipe import parse_recipe

Q4_0, Q8_0 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0


@pytest.mark.parametrize("rows, blocks", [(1, 1), (5, 3), (17, 7)])
def test_blocks_dequantize_in_gguf_to_our_weights(rows, blocks):
    """Any codes and float16 scales: gguf's dequantization of our blocks is our dequantization, bit for bit."""
    g = torch.Generator().manual_seed(rows * blocks)
    scale = torch.randn(rows, blocks, generator=g).to(torch.float16).float()
    for pack, low, qtype in ((pack_q4_0, -8, Q4_0), (pack_q8_0, -128, Q8_0)):
        codes = torch.randint(low, -low, (rows, 32 * blocks), generator=g).to(torch.int8)
        ours = dequantize(codes, scale, None, 32).numpy()
        np.testing.assert_array_equal(gguf.quants.dequantize(pack(codes, scale), qtype), ours)


def test_our_int4_rounding_is_llama_cpps_q4_0():
    """INT4 g32 symmetric RTN with float16 scales gives the bytes llama.cpp's own Q4_0 quantizer (gguf's port)
    makes of the same weights: the largest-magnitude weight / -8 is both scale rules."""
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    codes, scale, _ = rtn_quantize(w, IntFormat(4, 32, True), scale_dtype="float16")
    ours = pack_q4_0(codes, scale)
    np.testing.assert_array_equal(ours, gguf.quants.quantize(w.numpy(), Q4_0))


def test_gguf_recipe_validation():
    ok = {"export": ["gguf"], "passes": [{"type": "quantize", "weights": {"bits": 4, "group_size": 32}}]}
    parse_recipe(ok)
    refusals = {
        "int4-g64-sym with float16 scales has no exact GGUF type": {"weights": {"bits": 4, "group_size": 64}},
        "int4-g32-asym": {"weights": {"bits": 4, "group_size": 32, "symmetric": False}},
        "with bfloat16 scales": {"weights": {"bits": 8, "group_size": 32}, "scale_dtype": "bfloat16"},
    }
    for message, change in refusals.items():
        with pytest.raises(RecipeError, match=message):
            parse_recipe({**ok, "passes": [{"type": "quantize", **change}]})
    with pytest.raises(RecipeError, match="llama.cpp runs dense linears"):
        parse_recipe({**ok, "passes": [{"type": "lowrank", "rank": 4}, *ok["passes"]]})
    allocate = {"type": "allocate_bits", "candidates": ["int4 g32", "int8 channel"], "budget": {"bits_per_weight": 5}}
    with pytest.raises(RecipeError, match=r"candidates \(int8 channel\)"):
        parse_recipe({**ok, "passes": [allocate, *ok["passes"]]})


def _compress(src, calib_file, out, bits=4):
    recipe = small_recipe(calib_file, {"bits": bits, "group_size": 32}, evaluate=None, export=["safetensors", "gguf"])
    return compressor.compress(recipe, model=str(src), output=out, quiet=True)


@pytest.mark.parametrize("family, bits", [("llama", 4), ("mistral", 4), ("qwen2", 8), ("gemma3", 4)])
def test_transformers_reads_our_gguf_with_our_logits(family, bits, tiny_model_dir, calib_file, tmp_path):
    """transformers' GGUF reader (which undoes llama's q/k permutation and gemma's norm offset) gives the logits of
    compressor.load on the same run. gemma3: read with the artifact's config, as the reader drops the per-layer
    sliding pattern the file carries (checked in the metadata)."""
    out = tmp_path / "out"
    _compress(tiny_model_dir(family), calib_file, out, bits)
    config = None
    reader = gguf.GGUFReader(out / "model.gguf")
    types = {t.tensor_type for t in reader.tensors}
    assert (Q4_0 if bits == 4 else Q8_0) in types
    if family == "gemma3":
        config = AutoConfig.from_pretrained(out)
        config.quantization_config = None
        pattern = reader.fields["gemma3.attention.sliding_window_pattern"].contents()
        assert pattern == [t == "sliding_attention" for t in config.layer_types]
    theirs = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", config=config, dtype=torch.float32)
    ours = compressor.load(out)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "llama.cpp" in card and "GGUF" in (out / "summary.md").read_text()


def test_metadata_names_what_llama_cpp_reads(tiny_model_dir, calib_file, tmp_path):
    """qwen3 (head_dim not hidden / heads): key and value length, q/k norms, the tokenizer and the file type."""
    out = tmp_path / "out"
    _compress(tiny_model_dir("qwen3"), calib_file, out)
    config = json.loads((out / "config.json").read_text())
    reader = gguf.GGUFReader(out / "model.gguf")
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "qwen3"
    assert field("qwen3.attention.key_length") == config["head_dim"] == field("qwen3.rope.dimension_count")
    assert field("qwen3.block_count") == config["num_hidden_layers"]
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == config["vocab_size"]
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_q.weight", "token_embd.weight", "output_norm.weight"} <= names


def test_export_gguf_command_equals_the_runs_file(tiny_model_dir, calib_file, tmp_path):
    """`compress export-gguf` of a written artifact gives the run's own GGUF, tensor for tensor; a format with no
    GGUF type is refused with exit 2 and nothing written."""
    out = tmp_path / "out"
    _compress(tiny_model_dir("llama"), calib_file, out)
    again = tmp_path / "again"
    done = CliRunner().invoke(main, ["export-gguf", str(out), str(again), "-q"])
    assert done.exit_code == 0, done.output
    a, b = gguf.GGUFReader(out / "model.gguf"), gguf.GGUFReader(again / "model.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and np.array_equal(np.asarray(x.data), np.asarray(y.data))

    asym = tmp_path / "asym"
    recipe = small_recipe(calib_file, {"bits": 4, "group_size": 32, "symmetric": False}, evaluate=None)
    compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=asym, quiet=True)
    refused = CliRunner().invoke(main, ["export-gguf", str(asym), str(tmp_path / "no")])
    assert refused.exit_code == 2 and "no exact GGUF type" in refused.output
    assert not (tmp_path / "no").exists()
    record = json.loads((again / "gguf_export.json").read_text())["tensors"]
    assert record["blk.0.attn_q.weight"] == "Q4_0" and record["output_norm.weight"] == "F32"
    done = CliRunner().invoke(main, ["export-gguf", str(out), str(again), "-q", "--overwrite"])
    assert done.exit_code == 0, done.output  # its own output is recognised


def test_unsupported_family_fails_before_the_passes(tiny_model_dir, calib_file, tmp_path):
    recipe = small_recipe(calib_file, {"bits": 4, "group_size": 32}, evaluate=None, export=["gguf"])
    with pytest.raises(ModelError, match="GGUF export does not support model type 'opt'"):
        compressor.compress(recipe, model=str(tiny_model_dir("opt")), output=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


LLAMA_CPP_PYTHON = os.environ.get("COMPRESSOR_LLAMA_CPP_PYTHON")  # a python with llama-cpp-python (opt-in)
LLAMA_CPP_LOGITS = """
import sys, numpy as np
from llama_cpp import Llama
ids = [int(t) for t in sys.argv[2].split(",")]
llm = Llama(sys.argv[1], n_ctx=64, logits_all=True, n_threads=2, verbose=False)
llm.eval(ids)
np.save(sys.argv[3], np.array(llm.scores[: len(ids)], dtype=np.float32))
"""


@pytest.mark.skipif(not LLAMA_CPP_PYTHON, reason="set COMPRESSOR_LLAMA_CPP_PYTHON to a python with llama-cpp-python")
@pytest.mark.parametrize("family, bits", [("llama", 4), ("qwen2", 8)])
def test_llama_cpp_runs_our_file_with_our_logits(family, bits, tiny_model_dir, calib_file, tmp_path):
    """llama.cpp itself loads the file and its logits match compressor.load's within its int8 activation rounding
    (Q4_0 / Q8_0 dot products run on Q8 activations): same greedy token at every position."""
    out = tmp_path / "out"
    _compress(tiny_model_dir(family), calib_file, out, bits)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    script = tmp_path / "logits.py"
    script.write_text(LLAMA_CPP_LOGITS)
    npy = tmp_path / "logits.npy"
    done = subprocess.run(
        [LLAMA_CPP_PYTHON, str(script), str(out / "model.gguf"), ",".join(map(str, ids[0].tolist())), str(npy)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.from_numpy(np.load(npy))
    with torch.no_grad():
        ours = compressor.load(out)(input_ids=ids).logits[0]
    scale = float(ours.abs().max())
    assert float((theirs - ours).abs().max()) < 0.05 * scale
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
