"""Hashes of every artifact file for a zoo of recipes x tiny models (and optionally SmolLM2 `w4-gptq`).

A refactor that must not change behaviour is checked by running this before and after and comparing:

    python benchmarks/artifact_hashes.py --out /tmp/before.json            # on the old commit
    python benchmarks/artifact_hashes.py --out /tmp/after.json             # on the new one
    python benchmarks/artifact_hashes.py --compare /tmp/before.json /tmp/after.json

`--smollm2 [RECIPE ...]` adds bundled recipes (default `w4-gptq`) on the real model (minutes each). Tiny models and the
calibration text live under `--work` (fixed paths: the recipe copy in an artifact names them; several runs may
share it). Files that carry timings (`report.json`, `summary.md`, the model card) are hashed after dropping timing
fields; `report.json` is hashed per top-level key so that a difference names its section.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script this folder is sys.path[0]; keep it off the path so no file here can shadow a package (transformers
# probes `kernels`; the kernel benchmark was once benchmarks/kernels.py)
sys.path[:] = [str(ROOT), str(ROOT / "tests")] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]

_TIMING_KEY = re.compile(r"seconds|timings|tokens_per_s|peak_rss|elapsed")
_TIMING_LINE = re.compile(r"tok/s|tokens/s|seconds|\d+(\.\d+)? ?s\b|peak|RSS|took", re.IGNORECASE)


def _small(calib: Path, passes: list[dict], **extra) -> dict:
    recipe = {
        "calibration": {"source": str(calib), "num_samples": 8, "seq_len": 32, "batch_size": 2, "dtype": "float32"},
        "passes": passes,
        "evaluate": {"perplexity_text": str(calib), "seq_len": 32, "max_windows": 2},
    }
    recipe.update(extra)
    return recipe


def _q(method: str = "gptq", **weights) -> dict:
    return {"type": "quantize", "method": method, "weights": {"bits": 4, "group_size": 32, **weights}}


def zoo(calib: Path) -> dict[str, tuple[str, dict]]:
    """name -> (family, recipe dict)."""
    cases: dict[str, tuple[str, dict]] = {}
    for fam in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "opt", "gpt2", "bert"):
        cases[f"{fam}-gptq"] = (fam, _small(calib, [_q()]))
        cases[f"{fam}-rtn-asym"] = (fam, _small(calib, [_q("rtn", symmetric=False)]))
    for fam in ("llama", "opt", "gpt2", "gemma3"):
        cases[f"{fam}-gptq-awq"] = (fam, _small(calib, [{**_q(), "awq": True}]))
    cases["llama-gptq-static-clip"] = ("llama", _small(calib, [{**_q(), "static_groups": True, "clip_search": True}]))
    cases["llama-fp8-tensor"] = ("llama", _small(calib, [_q("rtn", format="fp8", bits=8, strategy="tensor")]))
    cases["gpt2-lowrank"] = ("gpt2", _small(calib, [{"type": "lowrank", "rank": 4}, _q()]))
    cases["llama-gptq-dyn"] = ("llama", _small(calib, [{**_q(symmetric=False), "act_order": False}]))
    cases["llama-gptq-g40-ragged"] = ("llama", _small(calib, [{**_q(group_size=40), "group_policy": "ragged"}]))
    cases["llama-gptq-g40-fallback"] = ("llama", _small(calib, [_q(group_size=40)]))
    cases["llama-w8"] = ("llama", _small(calib, [_q("rtn", bits=8, strategy="channel")]))
    cases["llama-fp8-channel"] = ("llama", _small(calib, [_q("rtn", format="fp8", bits=8, strategy="channel")]))
    cases["llama-fp8-block"] = (
        "llama",
        _small(calib, [_q("rtn", format="fp8", bits=8, strategy="block", block_size=[32, 32])]),
    )
    cases["llama-lmhead-emb"] = ("llama", _small(calib, [{**_q(), "lm_head": True, "embeddings": True}]))
    cases["llama-ignore"] = ("llama", _small(calib, [{**_q(), "ignore": ["mlp\\.down_proj"]}]))
    alloc = {
        "type": "allocate_bits",
        "candidates": ["int3 g32", "int4 g32", "int8 channel"],
        "budget": {"bits_per_weight": 4.6},
        "method": "measured",
        "num_samples": 4,
        "cache": False,
    }
    cases["llama-allocate"] = ("llama", _small(calib, [alloc, _q()]))
    cases["llama-allocate-lim"] = ("llama", _small(calib, [{**alloc, "method": "lim", "granularity": "block"}, _q()]))
    cases["qwen2-allocate-fp8"] = (
        "qwen2",
        _small(calib, [{**alloc, "candidates": ["int4 g32", "fp8 channel"], "budget": {"bits_per_weight": 6}}, _q()]),
    )
    cases["llama-lowrank"] = ("llama", _small(calib, [{"type": "lowrank", "rank": 4}, _q()]))
    cases["llama-lowrank-budget"] = (
        "llama",
        _small(calib, [{"type": "lowrank", "budget_bits_per_weight": 0.5, "max_rank": 16}, {**_q(), "awq": True}]),
    )
    cases["llama-score-remove"] = (
        "llama",
        _small(calib, [{"type": "score", "measure_samples": 2}, {"type": "remove_blocks", "count": 1}, _q()]),
    )
    cases["mistral-fuse"] = ("mistral", _small(calib, [{"type": "fuse_blocks", "count": 1}, _q()]))
    cases["llama-onnx-nbits"] = ("llama", _small(calib, [{**_q(), "lm_head": True}], export=["safetensors", "onnx"]))
    cases["qwen2-onnx-qdq"] = (
        "qwen2",
        _small(calib, [_q()], export=["safetensors", "onnx"], onnx={"format": "qdq"}),
    )
    return cases


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if not _TIMING_KEY.search(k)}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def hash_artifact(folder: Path) -> dict[str, str]:
    """Relative path -> hash; report.json per top-level key, text files carrying timings without those lines."""
    out: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if rel == "report.json":
            report = _strip_timings(json.loads(path.read_text()))
            for key, value in report.items():
                out[f"report.json:{key}"] = _sha(json.dumps(value, sort_keys=True).encode())
        elif rel in ("summary.md", "README.md"):
            lines = [ln for ln in path.read_text().splitlines() if not _TIMING_LINE.search(ln)]
            out[rel] = _sha("\n".join(lines).encode())
        else:
            out[rel] = _sha(path.read_bytes())
    return out


def run(work: Path, only: str | None, smollm2: list[str]) -> dict[str, dict[str, str]]:
    """Run the cases; models and calibration text are made once under `work` and reused (several processes may
    share `work`: each writes its artifacts into a folder of its own, removed after hashing)."""
    from tiny_models import CORPUS, make_tiny_model

    import compressor

    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.txt"
    if not calib.is_file() or calib.read_text() != CORPUS:
        calib.write_text(CORPUS)
    results: dict[str, dict[str, str]] = {}
    models: dict[str, Path] = {}
    outputs = Path(tempfile.mkdtemp(prefix="out-", dir=work))
    try:
        for name, (family, recipe) in zoo(calib).items():
            if only and not re.search(only, name):
                continue
            if family not in models:
                folder = work / "models" / family
                models[family] = folder if (folder / "config.json").is_file() else make_tiny_model(family, folder)
            out = outputs / name
            compressor.compress(recipe, model=str(models[family]), output=out, quiet=True)
            results[name] = hash_artifact(out)
            print(f"{name}: {len(results[name])} entries", flush=True)
        for name in smollm2:
            out = outputs / f"smollm2-{name}"
            compressor.compress(ROOT / "recipes" / f"{name}.yaml", output=out, quiet=True)
            results[f"smollm2-{name}"] = hash_artifact(out)
            print(f"smollm2-{name} done", flush=True)
    finally:
        shutil.rmtree(outputs, ignore_errors=True)
    return results


def compare(a: dict, b: dict) -> int:
    """Print every entry that differs in the cases both runs have (and the cases only one has); returns the count."""
    diffs = 0
    for case in sorted(set(a) ^ set(b)):
        print(f"ONLY IN {'BEFORE' if case in a else 'AFTER'}: {case}")
    for case in sorted(set(a) & set(b)):
        ea, eb = a[case], b[case]
        for key in sorted(set(ea) | set(eb)):
            if ea.get(key) != eb.get(key):
                diffs += 1
                print(f"DIFF {case} {key}: {ea.get(key)} -> {eb.get(key)}")
    print(f"{diffs} differing entries over {len(set(a) & set(b))} cases")
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the hashes here (JSON)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/artifact-hashes"), help="models and outputs")
    ap.add_argument("--only", help="regex: run only the matching cases")
    ap.add_argument(
        "--smollm2",
        nargs="*",
        metavar="RECIPE",
        help="also SmolLM2 with these bundled recipes (names under recipes/; none given: w4-gptq)",
    )
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        sys.exit(1 if compare(*(json.loads(p.read_text()) for p in args.compare)) else 0)
    smollm2 = [] if args.smollm2 is None else (args.smollm2 or ["w4-gptq"])
    results = run(args.work, args.only, smollm2)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print("command: python benchmarks/artifact_hashes.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
