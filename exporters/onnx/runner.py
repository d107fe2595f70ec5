"""A small onnxruntime driver for exported decoders: prefill, decode steps with the KV cache, greedy generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .graph import KvSpec


def default_providers(available: list[str]) -> list[str]:
    """CUDA first where onnxruntime-gpu finds a GPU (nodes it lacks a kernel for fall back to the CPU), else CPU."""
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def import_onnxruntime():
    """onnxruntime, or a CompressorError that says which extra installs it."""
    try:
        import onnxruntime
    except ImportError:
        from compressor.errors import CompressorError

        raise CompressorError(
            "running ONNX files needs onnxruntime, which is not installed",
            fix='pip install "compressor[onnx]" (CPU) or "compressor[gpu]" (onnxruntime-gpu, CUDA)',
        ) from None
    return onnxruntime


class OnnxCausalLM:
    """Runs `model.onnx` written by this exporter (on CUDA where onnxruntime-gpu sees a GPU, else on the CPU,
    unless `providers` says otherwise)."""

    def __init__(
        self,
        folder: str | Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        session_config: dict[str, str] | None = None,
    ):
        ort = import_onnxruntime()
        folder = Path(folder)
        opts = ort.SessionOptions()
        for key, value in (session_config or {}).items():
            opts.add_session_config_entry(key, value)
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), opts, providers=providers or default_providers(ort.get_available_providers())
        )
        names = [i.name for i in self.session.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        shape = self.session.get_inputs()[names.index(self.past_names[0])].shape
        self.spec = KvSpec(len(self.past_names) // 2, int(shape[1]), int(shape[3]))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.config = json.loads((folder / "config.json").read_text())

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.spec.kv_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, np.float32) for _ in self.past_names]

    def step(self, ids: np.ndarray, past: list[np.ndarray], seen: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Feed `ids` [B, S] after `seen` tokens (whose cache is `past`); returns logits [B, S, V] and presents."""
        batch, seq = ids.shape
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, seen + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(seen, seen + seq, dtype=np.int64), (batch, seq)).copy(),
            **dict(zip(self.past_names, past)),
        }
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def generate(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy decoding: `new_tokens` tokens after the prompt `ids` [1, S] (no stopping at EOS)."""
        logits, past = self.step(ids, self.empty_past(ids.shape[0]), 0)
        seen = ids.shape[1]
        out = []
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1)[:, None]
            out.append(nxt)
            logits, past = self.step(nxt, past, seen)
            seen += 1
        return np.concatenate(out, axis=1)
