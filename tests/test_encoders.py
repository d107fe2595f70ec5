"""Headless encoders (sentence-embedding models) end to end: the default recipe evaluates them by embedding
similarity and carries their sentence-transformers files into the artifact."""

import json
import logging

import pytest
import torch
import transformers as tf
from click.testing import CliRunner
from tiny_models import make_tokenizer, tiny_config

import compressor
from compressor.cli import main
from compressor.eval.embeddings import mean_pool
from compressor.eval.metrics import evaluate_windows
from exporters.sentence_files import copy_sentence_transformers_files

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]
POOLING = {"word_embedding_dimension": 96, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
ST_FILES = {  # relative path -> content, as sentence-transformers writes them
    "modules.json": json.dumps(MODULES, indent=2),
    "1_Pooling/config.json": json.dumps(POOLING, indent=2),
    "sentence_bert_config.json": json.dumps({"max_seq_length": 128, "do_lower_case": False}),
    "config_sentence_transformers.json": json.dumps({"__version__": {"sentence_transformers": "3.0.1"}}),
}
# the default recipe (w4-gptq), smaller: the tiny model has 256 positions
SMALL = {"calibration.num_samples": 8, "calibration.seq_len": 64, "evaluate.seq_len": 64, "evaluate.max_windows": 3}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny headless BertModel (no LM head, as sentence-embedding models ship) with sentence-transformers files."""
    folder = tmp_path_factory.mktemp("tiny-bert-embedder")
    tokenizer = make_tokenizer(folder)
    config = tiny_config("bert", len(tokenizer))
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    tf.BertModel(config).save_pretrained(folder)
    for rel, text in ST_FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    (folder / "2_Normalize").mkdir()  # Normalize keeps no files
    return folder


def _check_artifact(out, source, metrics: dict) -> None:
    """Embedding figures instead of logit ones, no greedy sample, the sentence-transformers files as they were."""
    assert {"embedding_cosine", "embedding_cosine_min", "eval_windows", "windows"} <= set(metrics)
    assert not {"perplexity", "kl_divergence", "top1_agreement", "sample", "base_sample"} & set(metrics)
    cosines = metrics["windows"]["embedding_cosine"]
    assert len(cosines) == metrics["eval_windows"] == 3
    assert 0.9 < metrics["embedding_cosine_min"] <= metrics["embedding_cosine"] <= 1 + 1e-6
    assert sum(cosines) / 3 == pytest.approx(metrics["embedding_cosine"], abs=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["embedding_cosine"] == metrics["embedding_cosine"]
    for rel in ST_FILES:
        assert (out / rel).read_bytes() == (source / rel).read_bytes(), rel
        assert rel in report["files"]
    assert (out / "2_Normalize").is_dir()
    assert "embedding cosine to base" in (out / "summary.md").read_text()
    assert (out / "quality.png").read_bytes().startswith(b"\x89PNG")
    # the artifact runs in compressor.load and in transformers (compressed-tensors), with the same embeddings
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = compressor.load(out)(input_ids=ids).last_hidden_state
        theirs = tf.AutoModel.from_pretrained(out, dtype=torch.float32)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_default_recipe_on_a_headless_encoder(encoder_dir, tmp_path):
    out = tmp_path / "out"
    overrides = {k.replace(".", "__"): v for k, v in SMALL.items()}
    result = compressor.compress("w4-gptq", model=str(encoder_dir), output=out, quiet=True, **overrides)
    assert result.report["model"]["family"] == "bert" and result.plan.layers
    _check_artifact(out, encoder_dir, result.metrics)


def test_cli_default_recipe_on_a_headless_encoder(encoder_dir, tmp_path):
    out = tmp_path / "out"
    sets = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(main, ["--recipe", "w4-gptq", "--model", str(encoder_dir), "-o", str(out), "-q", *sets])
    assert result.exit_code == 0, result.output
    _check_artifact(out, encoder_dir, json.loads((out / "report.json").read_text())["metrics"])


def test_encoder_without_base_reports_only_the_windows(encoder_dir):
    model = tf.AutoModel.from_pretrained(encoder_dir, dtype=torch.float32).eval()
    windows = torch.randint(5, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    assert evaluate_windows(model, windows, None, causal=False, quiet=True) == {"eval_windows": 3, "eval_tokens": 48}
    same = evaluate_windows(model, windows, model, causal=False, quiet=True)
    assert same["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_mean_pool_leaves_out_masked_positions():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, 0])


def test_sentence_transformers_files_outside_the_model_or_unreadable(tmp_path, caplog):
    source, out = tmp_path / "src", tmp_path / "out"
    (source / "1_Dense").mkdir(parents=True)
    (source / "1_Dense" / "config.json").write_text("{}")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("x")
    modules = [
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Dense", "type": "sentence_transformers.models.Dense"},
        {"path": "../secret", "type": "sentence_transformers.models.Dense"},
    ]
    (source / "modules.json").write_text(json.dumps(modules))
    out.mkdir()
    with caplog.at_level(logging.WARNING):
        files = copy_sentence_transformers_files(source, out)
    assert files == ["modules.json", "1_Dense/config.json"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "1_Dense",
        "1_Dense/config.json",
        "modules.json",
    ]
    assert "outside the model directory" in caplog.text
    (source / "modules.json").write_text("not json")
    with caplog.at_level(logging.WARNING):
        assert copy_sentence_transformers_files(source, out) == ["modules.json"]  # copied as it is, not followed
    assert "not a sentence-transformers module list" in caplog.text
    assert copy_sentence_transformers_files(None, out) == []


@pytest.mark.parametrize("recipe, kind", [("w4-layerwise", "allocate_bits"), ("prune25-w4", "score")])
def test_passes_that_need_a_head_refuse_a_headless_encoder(recipe, kind, encoder_dir, tmp_path):
    """Bit allocation and measured block removal read token predictions: refused up front (exit 2, naming the pass
    and what to use instead), not an internal error minutes into the run."""
    out = tmp_path / "out"
    sets = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(main, ["--recipe", recipe, "--model", str(encoder_dir), "-o", str(out), "-q", *sets])
    assert result.exit_code == 2, result.output
    assert f"the {kind} pass measures the model's token predictions" in result.output
    assert "BertModel has no LM head" in result.output and "w4-gptq" in result.output
    assert not out.exists()
