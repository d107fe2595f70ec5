import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import CORPUS, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir('llama') -> a saved random tiny model of that family (cached per session)."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return make


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CORPUS)
    return path


def small_recipe(calib_file: Path, weights: dict | None = None, method: str = "gptq", **extra) -> dict:
    """A fast recipe for tiny models (float32 calibration: results must not depend on the CPU's bfloat16 support)."""
    recipe = {
        "calibration": {
            "source": str(calib_file),
            "num_samples": 8,
            "seq_len": 32,
            "batch_size": 2,
            "dtype": "float32",
        },
        "passes": [{"type": "quantize", "method": method, "weights": weights or {"bits": 4, "group_size": 32}}],
        "evaluate": {"perplexity_text": str(calib_file), "seq_len": 32, "max_windows": 2},
    }
    for key, value in extra.items():
        recipe[key] = value
    return recipe


@pytest.fixture(scope="session")
def head32_model_dir(tmp_path_factory):
    """Factory: tiny model of `family` with head_dim 32 (GroupQueryAttention on CPU needs a multiple of 16)."""
    import torch
    import transformers as tf
    from tiny_models import make_tokenizer, tiny_config

    cache = {}

    def make(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"tiny32-{family}")
            tok = make_tokenizer(folder)
            config = tiny_config(family, len(tok))
            config.head_dim = 32  # q/k/v 128 wide on a 96-wide hidden state: o_proj has K = 128
            torch.manual_seed(3)
            tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
            cache[family] = folder
        return cache[family]

    return make


@pytest.fixture
def block_watch(monkeypatch):
    """Watch a streamed llama-style model (`model.model.layers`): `.most` is the largest number of blocks resident
    at once; loading the whole model fails the test. `monkeypatch.undo()` ends the watch."""
    from compressor.models.lazy import LazyModel

    class Watch:
        most = 0

    watch, materialize = Watch(), LazyModel.materialize

    def counting(self, prefix=""):
        materialize(self, prefix)
        resident = sum(not any(p.is_meta for p in b.parameters()) for b in self.model.model.layers)
        watch.most = max(watch.most, resident)

    monkeypatch.setattr(LazyModel, "materialize", counting)
    monkeypatch.setattr(LazyModel, "materialize_all", lambda self: pytest.fail("the whole model was loaded"))
    return watch
