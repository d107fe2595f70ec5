"""One AutoScheme budget, run inside the peer venv (auto-round 0.15); started by peer_autoscheme.py.

Loads the float32 checkpoint, lets AutoRound's AutoScheme pick int2/3/4/8 (group 64, symmetric) per linear at
`--avg-bits`, quantizes with `iters=0` (AutoRound's RTN path) on the CPU, then evaluates the in-memory
fake-quantized model and the base model on the given token windows: perplexity = exp(mean next-token NLL), KL(base ||
quantized) averaged over every position, batch 4, float32 (the formulas of compressor/eval/metrics.py). Imports
nothing from `compressor`: this venv does not have it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from collections import Counter

# benchmarks/ holds modules (kernels.py) that shadow packages transformers imports: keep it off the path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import torch  # noqa: E402

# rss_mb and evaluate (the formulas of compressor/eval/metrics.py) from benchmarks/peer_common.py, loaded by path
_spec = importlib.util.spec_from_file_location("peer_common", os.path.join(HERE, "peer_common.py"))
peer_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_common)
rss_mb, evaluate = peer_common.rss_mb, peer_common.evaluate

BITS = (2, 3, 4, 8)
GROUP = 64


def options():
    from auto_round.schemes import QuantizationScheme

    return [
        QuantizationScheme.from_dict({"bits": b, "group_size": GROUP, "sym": True, "data_type": "int", "act_bits": 16})
        for b in BITS
    ]


def quantize(model, tokenizer, args) -> tuple[object, float, dict]:
    """AutoScheme + AutoRound(iters=0) on `model` in place; returns (model, seconds, layer_config)."""
    from auto_round import AutoRound, AutoScheme

    scheme = AutoScheme(
        avg_bits=args.avg_bits,
        options=options(),
        nsamples=args.scheme_nsamples,
        seqlen=args.scheme_seqlen,
        dataset=args.calibration,
        device_map="cpu",
    )
    start = time.perf_counter()
    ar = AutoRound(
        model,
        tokenizer=tokenizer,
        scheme=scheme,
        iters=0,
        dataset=args.calibration,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        device_map="cpu",
        disable_opt_rtn=not args.opt_rtn,
        amp=args.amp,  # AutoRound's default True casts the model to bfloat16 on CPU; --no-amp keeps float32
        enable_torch_compile=False,
    )
    qmodel, layer_config = ar.quantize()
    return qmodel, time.perf_counter() - start, layer_config


def bit_counts(model) -> dict:
    """Per quantized linear: bits, weights; AutoRound's bit count and ours (fp16 scale per group, no zero-point)."""
    from auto_round.auto_scheme.utils import compute_layer_bits

    hist: Counter = Counter()
    params = ar_bits = our_bits = 0
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or getattr(m, "bits", 16) >= 16:
            continue
        n = m.weight.numel()
        groups = m.out_features * math.ceil(m.in_features / GROUP)
        hist[int(m.bits)] += 1
        params += n
        ar_bits += compute_layer_bits(m)[0]
        our_bits += m.bits * n + 16 * groups
        layers[name] = int(m.bits)
    return {
        "bits_histogram": {str(k): v for k, v in sorted(hist.items())},
        "quantized_layers": sum(hist.values()),
        "quantized_params": params,
        "avg_bits_reported": ar_bits / params,
        "bits_per_weight_ours": our_bits / params,
        "layer_bits": layers,
    }


def check_on_grid(model) -> int:
    """How many quantized linears hold weights with more distinct values per group than their bits allow."""
    bad = 0
    for _, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or getattr(m, "bits", 16) >= 16:
            continue
        w = m.weight.detach().float().reshape(m.out_features, -1, GROUP)[:8]
        distinct = max(len(torch.unique(g)) for row in w for g in row)
        bad += int(distinct > 2 ** int(m.bits))
    return bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="float32 checkpoint directory")
    ap.add_argument("--calibration", required=True, help="JSON list of calibration strings")
    ap.add_argument("--windows", required=True, help="torch-saved int64 [W, seq] eval windows")
    ap.add_argument("--avg-bits", type=float, required=True)
    ap.add_argument("--nsamples", type=int, default=128, help="AutoRound's calibration (opt-RTN imatrix)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--scheme-nsamples", type=int, default=16, help="AutoScheme's scoring samples (its default)")
    ap.add_argument("--scheme-seqlen", type=int, default=256, help="AutoScheme's scoring length (its default)")
    ap.add_argument("--opt-rtn", action="store_true", help="AutoRound's optimized RTN (its iters=0 default; slow)")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="AutoRound amp (bf16 on CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--result", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    import auto_round
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    qmodel, quant_seconds, _ = quantize(model, tokenizer, args)
    rss_quant = rss_mb()
    counts = bit_counts(qmodel)
    off_grid = check_on_grid(qmodel)
    avg = counts["avg_bits_reported"]
    print(f"quantized in {quant_seconds:.1f} s: {counts['bits_histogram']}, AutoRound avg bits {avg:.4f}")

    qmodel = qmodel.to(torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    metrics = evaluate(qmodel, base, torch.load(args.windows))
    result = {
        "avg_bits_target": args.avg_bits,
        **{k: v for k, v in counts.items() if k != "layer_bits"},
        **metrics,
        "quant_seconds": quant_seconds,
        "peak_rss_mb": rss_quant,
        "peak_rss_total_mb": rss_mb(),
        "run_seconds": time.perf_counter() - start,
        "layers_off_grid": off_grid,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "scheme_nsamples": args.scheme_nsamples,
        "scheme_seqlen": args.scheme_seqlen,
        "opt_rtn": args.opt_rtn,
        "auto_round_version": auto_round.__version__,
        "torch_version": torch.__version__,
        "layer_bits": counts["layer_bits"],
    }
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
