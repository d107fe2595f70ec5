"""llama.cpp's side of `benchmarks/gguf_smollm2.py`, run in a venv with llama-cpp-python (and numpy) only.

    python gguf_llama_cpp_worker.py quantize SRC.gguf DST.gguf Q4_K_M
    python gguf_llama_cpp_worker.py evaluate --base F16.gguf --files a.gguf,b.gguf --windows w.npy --out r.json

`evaluate` runs every window (int32 token ids [n, seq]) through the base file and each file in llama.cpp and sums,
per window, the NLL of the next token and the KL of each file's next-token distribution from the base's, the
figures `compressor.eval.metrics` computes for our own models; then times greedy decoding (tokens/s, median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def quantize(src: str, dst: str, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({kind}) failed: {rc}")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logits(llm, tokens: np.ndarray) -> np.ndarray:
    llm.reset()
    llm.eval(tokens.tolist())
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def _decode_rate(llm, prompt: list[int], new_tokens: int = 64, repeats: int = 3) -> float:
    rates = []
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt)
        start, made = time.perf_counter(), 0
        for _ in llm.generate(prompt, top_k=1, reset=False):
            made += 1
            if made >= new_tokens:
                break
        rates.append(made / (time.perf_counter() - start))
    return statistics.median(rates)


def evaluate(base: str, files: list[str], windows: np.ndarray, threads: int) -> dict:
    from llama_cpp import Llama

    def load(path: str):
        return Llama(
            path, n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True, n_threads=threads, verbose=False
        )

    ref = load(base)
    models = {f: load(f) for f in files}
    out = {f: {"perplexity": [], "base_perplexity": [], "kl_divergence": []} for f in files}
    for k, tokens in enumerate(windows):
        base_logp = _log_softmax(_logits(ref, tokens))
        target = tokens[1:]
        base_nll = -base_logp[np.arange(len(target)), target].sum()
        for f, llm in models.items():
            logp = _log_softmax(_logits(llm, tokens))
            nll = -logp[np.arange(len(target)), target].sum()
            kl = (np.exp(base_logp) * (base_logp - logp)).sum() / len(tokens)
            out[f]["perplexity"].append(float(np.exp(nll / len(target))))
            out[f]["base_perplexity"].append(float(np.exp(base_nll / len(target))))
            out[f]["kl_divergence"].append(float(kl))
        if k % 16 == 0:
            print(f"window {k + 1}/{len(windows)}", flush=True)
    prompt = windows[0, :16].tolist()
    for f, llm in {base: ref, **models}.items():
        out.setdefault(f, {})["decode_tokens_per_s"] = _decode_rate(llm, prompt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("kind", help="llama.cpp file type, e.g. Q4_0, Q4_K_M")
    e = sub.add_parser("evaluate")
    e.add_argument("--base", required=True)
    e.add_argument("--files", required=True)
    e.add_argument("--windows", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.command == "quantize":
        quantize(args.src, args.dst, args.kind)
        return
    result = evaluate(args.base, args.files.split(","), np.load(args.windows), args.threads)
    with open(args.out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
