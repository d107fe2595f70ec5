"""Property-based fuzzing of the front door: generated recipes, valid and invalid, through `compressor.compress` on
a tiny model. Every case either succeeds or raises `CompressorError` (never another exception), and a failed case
leaves no output directory and no partial one beside it. Derandomized, so every CI run tries the same cases."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
from conftest import small_recipe
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import compressor

EXAMPLES = 200
_counter = itertools.count()

# values of every kind a recipe field could be given by mistake
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 3, 7, 64, 2**31, math.nan, math.inf, -math.inf, 1e-30, 0.5]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "é" * 5000, "../../etc/passwd", "/", "~", "int4 g128", "hf:", "builtin"]),
    st.lists(st.integers(-3, 300), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
PASS_TYPES = ["quantize", "score", "remove_blocks", "fuse_blocks", "allocate_bits", "lowrank", "gptq", "", "QUANTIZE"]
# keys that exist in the recipe (mutating them probes validation), and some that do not (probing unknown keys)
KEY_PATHS = [
    ("model",),
    ("trust_remote_code",),
    ("export",),
    ("max_shard_size",),
    ("output",),
    ("calibration", "source"),
    ("calibration", "num_samples"),
    ("calibration", "seq_len"),
    ("calibration", "seed"),
    ("calibration", "dtype"),
    ("calibration", "batch_size"),
    ("evaluate",),
    ("evaluate", "seq_len"),
    ("evaluate", "max_windows"),
    ("evaluate", "perplexity_text"),
    ("passes",),
    ("passes", 0, "method"),
    ("passes", 0, "weights", "bits"),
    ("passes", 0, "weights", "group_size"),
    ("passes", 0, "weights", "strategy"),
    ("passes", 0, "weights", "format"),
    ("passes", 0, "weights", "symmetric"),
    ("passes", 0, "scale_dtype"),
    ("passes", 0, "damp"),
    ("passes", 0, "ignore"),
    ("passes", 0, "lm_head"),
    ("unknown_key",),
    ("calibration", "sorce"),
    ("passes", 0, "wieghts"),
    ("hub", "repo_id"),
    ("onnx", "opset"),
]
EXTRA_PASSES = [
    {"type": "allocate_bits", "candidates": ["int4 g32", "int8 channel"], "budget": {"bits_per_weight": 5}},
    {"type": "allocate_bits", "candidates": ["int3 g32"], "budget": {"bits_per_weight": 1}},
    {"type": "allocate_bits", "candidates": ["int9 g3"], "budget": {"uniform": "int4 g32"}},
    {"type": "allocate_bits", "candidates": ["int4 g32", "int4 g32 rank 50%"], "budget": {"bits_per_weight": 3}},
    {"type": "allocate_bits", "candidates": ["keep rank 999"], "budget": {"bits_per_weight": 3}},
    {"type": "lowrank", "rank": 4},
    {"type": "remove_blocks", "count": 1},
    {"type": "remove_blocks", "count": 99},
    {"type": "fuse_blocks", "count": 1},
    {"type": "score"},
    {"type": "quantize", "method": "rtn", "weights": {"format": "fp8", "strategy": "channel", "bits": 8}},
]


@st.composite
def mutations(draw):
    """A list of (kind, argument) edits applied to a valid fast recipe."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "delete", "add_pass", "swap_passes", "path"]))
        if kind == "set":
            edits.append((kind, (draw(st.sampled_from(KEY_PATHS)), draw(ODD_VALUES))))
        elif kind == "delete":
            edits.append((kind, draw(st.sampled_from(KEY_PATHS))))
        elif kind == "add_pass":
            extra = draw(
                st.one_of(st.sampled_from(EXTRA_PASSES), st.builds(lambda t: {"type": t}, st.sampled_from(PASS_TYPES)))
            )
            edits.append((kind, (draw(st.integers(0, 2)), extra)))
        elif kind == "swap_passes":
            edits.append((kind, None))
        else:  # a path field pointed at something that is not a usable file
            field = draw(st.sampled_from([("calibration", "source"), ("evaluate", "perplexity_text"), ("model",)]))
            edits.append((kind, (field, draw(st.sampled_from(["missing", "directory", "empty", "binary"])))))
    return edits


def _set(recipe: dict, path: tuple, value) -> None:
    node = recipe
    for key in path[:-1]:
        if isinstance(node, list):
            if not node:
                return
            node = node[min(key, len(node) - 1)]
        else:
            node = node.setdefault(key, {}) if isinstance(node.get(key), dict | None) else node[key]
        if not isinstance(node, dict | list):
            return
    if isinstance(node, dict):
        node[path[-1]] = value


def _delete(recipe: dict, path: tuple) -> None:
    node = recipe
    for key in path[:-1]:
        node = (
            node[min(key, len(node) - 1)]
            if isinstance(node, list) and node
            else node.get(key)
            if isinstance(node, dict)
            else None
        )
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _bad_path(kind: str, tmp) -> str:
    target = tmp / f"{kind}-{next(_counter)}"
    if kind == "directory":
        target.mkdir()
    elif kind == "empty":
        target.write_text("")
    elif kind == "binary":
        target.write_bytes(bytes(range(256)) * 8)
    return str(target)


def _apply(recipe: dict, edits, tmp) -> tuple[dict, str | None]:
    model = None
    for kind, arg in edits:
        if kind == "set":
            _set(recipe, *arg)
        elif kind == "delete":
            _delete(recipe, arg)
        elif kind == "add_pass" and isinstance(recipe.get("passes"), list):
            recipe["passes"].insert(min(arg[0], len(recipe["passes"])), copy.deepcopy(arg[1]))
        elif kind == "swap_passes" and isinstance(recipe.get("passes"), list):
            recipe["passes"].reverse()
        elif kind == "path":
            field, what = arg
            if field == ("model",):
                model = _bad_path(what, tmp)
            else:
                _set(recipe, field, _bad_path(what, tmp))
    return recipe, model


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(edits=mutations())
def test_generated_recipes_succeed_or_raise_a_user_error(edits, fuzz_dir, calib_file, tiny_model_dir):
    base = small_recipe(calib_file, method="rtn")
    base["calibration"].update(num_samples=2, seq_len=16)
    base["evaluate"] = {"perplexity_text": str(calib_file), "seq_len": 16, "max_windows": 1, "generate_tokens": 2}
    recipe, bad_model = _apply(base, edits, fuzz_dir)
    out = fuzz_dir / f"out-{next(_counter)}"
    try:
        compressor.compress(recipe, model=bad_model or str(tiny_model_dir("llama")), output=out, quiet=True)
        event("succeeded")
    except compressor.CompressorError as err:
        event(f"refused: {type(err).__name__}")
        assert str(err) and "\n" not in str(err), err
        assert not out.exists()
    leftovers = [p.name for p in fuzz_dir.glob(f".{out.name}.*")]
    assert not leftovers, leftovers
