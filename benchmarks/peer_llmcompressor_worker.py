"""One llm-compressor GPTQ run inside the peer venv (llmcompressor 0.14); started by peer_llmcompressor.py.

Loads the float32 checkpoint, runs `oneshot` with a GPTQModifier (W4, group size `--group-size`, symmetric, int,
over every Linear but lm_head, `--actorder`) on our calibration windows given as a tokenized dataset of input_ids
(so llm-compressor sees exactly our token ids), saves the compressed checkpoint (compressed-tensors), loads it back
with transformers + compressed-tensors, and evaluates that model and the base model on the given token windows with
the formulas of compressor/eval/metrics.py (benchmarks/peer_common.py's `evaluate`): perplexity = exp(mean
next-token NLL), KL(base || quantized) and top-1 agreement over every position, batch 4, float32. If saving or
loading fails, the in-memory model is evaluated instead and the result says so. Imports nothing from `compressor`:
this venv does not have it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
import traceback

# benchmarks/ holds modules (kernels.py) that shadow packages transformers imports: keep it off the path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import torch  # noqa: E402

# rss_mb and evaluate (the formulas of compressor/eval/metrics.py) from benchmarks/peer_common.py, loaded by path
_spec = importlib.util.spec_from_file_location("peer_common", os.path.join(HERE, "peer_common.py"))
peer_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_common)
rss_mb, evaluate = peer_common.rss_mb, peer_common.evaluate


def calibration_dataset(windows: torch.Tensor):
    """Our windows as a tokenized datasets.Dataset (llm-compressor then skips its own tokenization)."""
    from datasets import Dataset

    ids = windows.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def modifier(args):
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": args.group_size,
    }
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        actorder=None if args.actorder == "none" else args.actorder,
        block_size=args.block_size,
        dampening_frac=args.damp,
    )


def quantize(model, tokenizer, windows: torch.Tensor, args) -> dict:
    """oneshot() on `model` in place; wall and CPU seconds (all threads) of the call."""
    from llmcompressor import oneshot

    dataset = calibration_dataset(windows)
    recipe = modifier(args)
    wall, cpu = time.perf_counter(), time.process_time()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=windows.shape[0],
        max_seq_length=windows.shape[1],
        shuffle_calibration_samples=False,
        batch_size=args.batch_size,
    )
    return {"quant_seconds": time.perf_counter() - wall, "quant_cpu_seconds": time.process_time() - cpu}


def quantized_config(model) -> dict:
    """What the model's quantization_config says (format, groups, actorder), as saved in config.json."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    groups = {
        name: {k: (g.get("weights") or {}).get(k) for k in ("num_bits", "group_size", "symmetric", "actorder")}
        for name, g in (qc.get("config_groups") or {}).items()
    }
    return {"format": qc.get("format"), "config_groups": groups, "ignore": qc.get("ignore")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="float32 checkpoint directory")
    ap.add_argument("--calibration", required=True, help="torch-saved int64 [N, seq] calibration windows")
    ap.add_argument("--windows", required=True, help="torch-saved int64 [W, seq] eval windows")
    ap.add_argument("--actorder", default="static", help="static (llm-compressor's default), weight, group, none")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update width (its default)")
    ap.add_argument("--damp", type=float, default=0.01, help="dampening_frac (its default)")
    ap.add_argument("--batch-size", type=int, default=1, help="calibration batch size (oneshot's default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-dir", required=True, help="where the compressed checkpoint goes")
    ap.add_argument("--result", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    import compressed_tensors
    import llmcompressor
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    calibration = torch.load(args.calibration)
    timing = quantize(model, tokenizer, calibration, args)
    rss_quant = rss_mb()
    print(f"quantized in {timing['quant_seconds']:.1f} s (CPU {timing['quant_cpu_seconds']:.1f} s)", flush=True)

    windows = torch.load(args.windows)
    evaluated, save_error, save_seconds, memory_vs_saved = "saved checkpoint", None, None, None
    qmodel = model
    try:
        shutil.rmtree(args.save_dir, ignore_errors=True)
        t = time.perf_counter()
        model.save_pretrained(args.save_dir, save_compressed=True)
        tokenizer.save_pretrained(args.save_dir)
        save_seconds = time.perf_counter() - t
        qmodel = AutoModelForCausalLM.from_pretrained(args.save_dir, dtype=torch.float32).eval()
        with torch.inference_mode():  # the loaded checkpoint against the in-memory model, first eval window
            ids = windows[:1]
            a = model(input_ids=ids, use_cache=False).logits.float()
            b = qmodel(input_ids=ids, use_cache=False).logits.float()
            memory_vs_saved = (a - b).abs().max().item()
        print(f"saved and reloaded: max |logit difference| vs in-memory {memory_vs_saved:.3g}", flush=True)
    except Exception as err:  # evaluate the in-memory model instead, and say so
        traceback.print_exc()
        evaluated, save_error, qmodel = "in-memory model", f"{type(err).__name__}: {err}"[:500], model
    if qmodel is not model:
        del model
    qconfig = quantized_config(qmodel)
    saved_mb = None
    if evaluated == "saved checkpoint":
        files = [os.path.join(args.save_dir, f) for f in os.listdir(args.save_dir) if f.endswith(".safetensors")]
        saved_mb = sum(os.path.getsize(f) for f in files) / 2**20

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    metrics = evaluate(qmodel.to(torch.float32).eval(), base, windows)
    result = {
        "actorder": args.actorder,
        "group_size": args.group_size,
        "block_size": args.block_size,
        "dampening_frac": args.damp,
        "batch_size": args.batch_size,
        "calibration_windows": list(calibration.shape),
        **metrics,
        **timing,
        "save_seconds": save_seconds,
        "peak_rss_mb": rss_quant,
        "peak_rss_total_mb": rss_mb(),
        "run_seconds": time.perf_counter() - start,
        "evaluated": evaluated,
        "save_error": save_error,
        "max_logit_diff_memory_vs_saved": memory_vs_saved,
        "saved_safetensors_mb": saved_mb,
        "quantization_config": qconfig,
        "threads": args.threads,
        "llmcompressor_version": llmcompressor.__version__,
        "compressed_tensors_version": compressed_tensors.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
