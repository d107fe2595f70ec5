"""Decode and prefill speed of every bundled recipe's artifact against the float32 model, in one run.

For each recipe in `recipes/` (or `--recipes`), the SmolLM2-135M artifact (made once with `compress`, cached under
`--work`) is loaded with `compressor.load(activations=...)` and timed beside the uncompressed float32 model
(transformers), and beside onnxruntime where the recipe exports ONNX:
- decode: greedy `model.generate` of `--tokens` new tokens after a short prompt, batch 1, minus a 1-token
  generation of the same prompt (so the prefill cancels): tokens/s of the decode steps alone;
- prefill: one forward of `--prefill` tokens, tokens/s.
Each figure is the median of `--runs` rounds; within a round every model runs once, in the same order, so a slow
moment of the machine hits all of them. Ratios are against the float32 model of the same round set.

With `--competitor` (default: both), the whole measurement is repeated with one CPU-bound process (a Python busy
loop) running beside it: the contended figures of issue #27 ("with one competing CPU-bound process").
`--profile` adds where a decode step's time goes (torch.profiler over `--tokens` greedy tokens, idle machine): the
compressor kernel ops, float matmuls (the lm_head when it is not quantized), the other aten ops, and the rest of the
wall time (Python: transformers' generate loop and module calls).

    python benchmarks/decode.py [--recipes recipes/w4-gptq.yaml ...] [--work /tmp/bench-decode] [--runs 5] \
        [--tokens 128] [--prefill 512] [--competitor both|none|only] [--activations int8-decode] [--profile]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/kernels.py would shadow the `kernels` package that transformers probes for: run from the repo root
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
PROMPT = "The history of the city"
# layer-wise mixes and the uniform INT4 artifact of the same size (issue #27: within 10% of its decode speed)
MIX_VS_UNIFORM = {
    "w4-layerwise": "w4-gptq",
    "w4-layerwise-vllm": "w4-gptq",
    "w4-layerwise-onnx": "w4-gptq-onnx",
    "w4-layerwise-onnx [onnxruntime]": "w4-gptq-onnx [onnxruntime]",
}
ORT_SESSION = {"session.intra_op.allow_spinning": "0"}  # spinning workers collapse when another job shares the cores


def _peer_common():
    spec = importlib.util.spec_from_file_location("peer_common", ROOT / "benchmarks" / "peer_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_artifact(recipe: Path, work: Path) -> Path:
    """The recipe's artifact on SmolLM2 (a `compress` subprocess; cached). Evaluation is cut to 2 windows."""
    out = work / recipe.stem
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    cmd = [sys.executable, "-m", "compressor.cli", "--recipe", str(recipe), "--output", str(out), "--overwrite"]
    cmd += ["--set", "evaluate.max_windows=2", "--quiet"]
    print(f"making {out.name}: {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


class TorchModel:
    """A transformers model (float32 base or compressor.load artifact) behind generate / prefill timers."""

    def __init__(self, model, prompt_ids: torch.Tensor, prefill_ids: torch.Tensor):
        self.model, self.prompt, self.prefill_ids = model.eval(), prompt_ids, prefill_ids

    @torch.inference_mode()
    def _generate(self, n: int) -> float:
        start = time.perf_counter()
        self.model.generate(
            input_ids=self.prompt,
            attention_mask=torch.ones_like(self.prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        return time.perf_counter() - start

    def decode_rate(self, tokens: int) -> float:
        first = self._generate(1)
        return (tokens - 1) / max(self._generate(tokens) - first, 1e-9)

    @torch.inference_mode()
    def prefill_rate(self) -> float:
        start = time.perf_counter()
        self.model(input_ids=self.prefill_ids, use_cache=False)
        return self.prefill_ids.shape[1] / (time.perf_counter() - start)


class OnnxModel:
    """The same two timers on onnxruntime (the exporter's KV-cache decoder; 2 threads, no spinning)."""

    def __init__(self, folder: Path, prompt_ids: torch.Tensor, prefill_ids: torch.Tensor):
        from exporters.onnx.runner import OnnxCausalLM

        self.lm = OnnxCausalLM(folder, threads=torch.get_num_threads(), session_config=ORT_SESSION)
        self.prompt, self.prefill_ids = prompt_ids.numpy(), prefill_ids.numpy()

    def decode_rate(self, tokens: int) -> float:
        start = time.perf_counter()
        self.lm.generate(self.prompt, 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        self.lm.generate(self.prompt, tokens)
        return (tokens - 1) / max(time.perf_counter() - start - first, 1e-9)

    def prefill_rate(self) -> float:
        start = time.perf_counter()
        self.lm.step(self.prefill_ids, self.lm.empty_past(1), 0)
        return self.prefill_ids.shape[1] / (time.perf_counter() - start)


@contextmanager
def competitor(on: bool):
    """One CPU-bound process beside the measurement (a Python busy loop), or nothing."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


def measure(models: dict, tokens: int, runs: int) -> dict[str, dict[str, float]]:
    """Median decode and prefill tokens/s per model over `runs` interleaved rounds."""
    for m in models.values():  # warm-up: first calls pay allocation and lazy initialisation
        m.decode_rate(4)
        m.prefill_rate()
    rates: dict[str, dict[str, list[float]]] = {n: {"decode": [], "prefill": []} for n in models}
    for _ in range(runs):
        for name, m in models.items():
            rates[name]["decode"].append(m.decode_rate(tokens))
            rates[name]["prefill"].append(m.prefill_rate())
    return {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rates.items()}


def profile_decode(model: TorchModel, tokens: int) -> dict[str, float]:
    """Milliseconds per decode token by kind of work: the ops' own time from torch.profiler, and the rest of the
    wall time of an unprofiled run (the profiler's per-op overhead would otherwise count as Python time)."""
    from torch.profiler import ProfilerActivity, profile

    model.decode_rate(4)
    wall_ms = statistics.median(1e3 / model.decode_rate(tokens) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model._generate(tokens)
    kinds = {"compressor kernels": 0.0, "float matmuls": 0.0, "other aten ops": 0.0}
    for event in prof.key_averages():
        if event.key.startswith("compressor::"):
            kinds["compressor kernels"] += event.self_cpu_time_total
        elif event.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
            kinds["float matmuls"] += event.self_cpu_time_total
        elif event.key.startswith("aten::"):
            kinds["other aten ops"] += event.self_cpu_time_total
    per_token = {k: v / 1e3 / tokens for k, v in kinds.items()}  # microseconds -> ms per token (prefill included)
    per_token["python and the rest"] = max(wall_ms - sum(per_token.values()), 0.0)
    per_token["wall"] = wall_ms
    return per_token


def print_table(title: str, rates: dict[str, dict[str, float]], sizes: dict[str, float]) -> None:
    base = rates["float32"]
    print(f"\n{title}")
    print(f"{'model':28} {'MB':>7} {'decode tok/s':>13} {'x float32':>10} {'prefill tok/s':>14} {'x float32':>10}")
    for name, r in rates.items():
        d, p = r["decode"] / base["decode"], r["prefill"] / base["prefill"]
        print(f"{name:28} {sizes[name]:7.1f} {r['decode']:13.1f} {d:10.2f} {r['prefill']:14.0f} {p:10.2f}")
    for mix, uniform in MIX_VS_UNIFORM.items():
        if mix in rates and uniform in rates:
            print(f"decode {mix} / {uniform}: {rates[mix]['decode'] / rates[uniform]['decode']:.2f}")


def _size_mb(folder: Path, pattern: str) -> float:
    return sum(f.stat().st_size for f in folder.glob(pattern)) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", type=Path, default=sorted((ROOT / "recipes").glob("*.yaml")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-decode"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--competitor", choices=["both", "none", "only"], default="both")
    ap.add_argument("--activations", default="int8-decode", help="compressor.load activations mode")
    ap.add_argument("--profile", action="store_true", help="also print where a decode step's time goes")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import compressor

    args.work.mkdir(parents=True, exist_ok=True)
    artifacts = {r.stem: make_artifact(r.resolve(), args.work) for r in args.recipes}
    base_dir = args.work / "smollm2-float32"
    tokenizer = _peer_common().export_checkpoint(base_dir)
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    text = (ROOT.parent / "shared" / "data" / "wikitext2-valid.txt").read_text()[:20000]
    prefill = tokenizer(text, return_tensors="pt")["input_ids"][:, : args.prefill]

    models = {"float32": TorchModel(AutoModelForCausalLM.from_pretrained(base_dir), prompt, prefill)}
    sizes = {"float32": _size_mb(base_dir, "*.safetensors")}
    for name, folder in artifacts.items():
        models[name] = TorchModel(compressor.load(folder, activations=args.activations), prompt, prefill)
        sizes[name] = _size_mb(folder, "*.safetensors")
        if (folder / "onnx" / "model.onnx").is_file():
            models[f"{name} [onnxruntime]"] = OnnxModel(folder / "onnx", prompt, prefill)
            sizes[f"{name} [onnxruntime]"] = _size_mb(folder / "onnx", "*")

    from compressor.runtime._ext import current_isa

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, kernels: {current_isa()}; torch {torch.__version__}")
    print(
        f"decode: greedy {args.tokens} tokens after a {prompt.shape[1]}-token prompt, batch 1; prefill: "
        f"{prefill.shape[1]} tokens; median of {args.runs} interleaved rounds; activations={args.activations}"
    )
    results = {}
    if args.profile:
        print(f"\nms per decode token ({args.tokens} greedy tokens: ops from torch.profiler, wall unprofiled)")
        results["profile_ms_per_token"] = {}
        for name, m in models.items():
            if isinstance(m, TorchModel):
                parts = profile_decode(m, args.tokens)
                results["profile_ms_per_token"][name] = parts
                print(f"{name:28} " + "  ".join(f"{k} {v:5.2f}" for k, v in parts.items()))
    for contended in {"both": (False, True), "none": (False,), "only": (True,)}[args.competitor]:
        with competitor(contended):
            rates = measure(models, args.tokens, args.runs)
        title = "with one competing CPU-bound process" if contended else "idle machine"
        print_table(title, rates, sizes)
        results["contended" if contended else "idle"] = rates
    print("\ncommand: python " + shlex.join(sys.argv))
    if args.json:
        args.json.write_text(json.dumps({"sizes_mb": sizes, **results}, indent=1))


if __name__ == "__main__":
    main()
