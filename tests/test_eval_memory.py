"""Evaluation in bounded memory: the same figures as whole-batch logits, without batch x sequence x vocabulary
tensors (compressor/eval/logits.py)."""

import copy
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from tiny_models import tiny_config

from compressor.eval import logits as eval_logits
from compressor.eval.logits import checked_split, forward
from compressor.eval.metrics import evaluate_windows

ROOT = Path(__file__).resolve().parents[1]


def reference_figures(model, windows, base, batch_size: int, causal: bool) -> dict:
    """The figures the straightforward way: whole-batch logits and log-softmax of both models at once."""
    nll = base_nll = kl = agree = 0.0
    per_window: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i : i + batch_size]
            logp = F.log_softmax(forward(model, ids).logits.float(), dim=-1)
            base_logp = F.log_softmax(forward(base, ids).logits.float(), dim=-1)
            if causal:
                target = ids[:, 1:].unsqueeze(-1)
                token_nll = -logp[:, :-1].gather(-1, target).squeeze(-1)
                base_token_nll = -base_logp[:, :-1].gather(-1, target).squeeze(-1)
                nll, base_nll = nll + token_nll.sum().item(), base_nll + base_token_nll.sum().item()
                per_window.setdefault("perplexity", []).extend(token_nll.mean(-1).exp().tolist())
                per_window.setdefault("base_perplexity", []).extend(base_token_nll.mean(-1).exp().tolist())
            token_kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
            kl += token_kl.sum().item()
            per_window.setdefault("kl_divergence", []).extend(token_kl.mean(-1).tolist())
            agree += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    count, positions = windows.shape[0] * (windows.shape[1] - 1), windows.numel()
    figures = {"kl_divergence": kl / positions, "top1_agreement": agree / positions, "windows": per_window}
    if causal:
        figures |= {"perplexity": math.exp(nll / count), "base_perplexity": math.exp(base_nll / count)}
    return figures


def tiny_pair(family: str, **config):
    """A tiny random model of `family` and a perturbed copy of it (the 'compressed' model), vocabulary 300."""
    cfg = tiny_config(family, 300)
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    base = (tf.BertForMaskedLM(cfg) if family == "bert" else tf.AutoModelForCausalLM.from_config(cfg)).eval()
    model = copy.deepcopy(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, base


CASES = {  # name -> (family, config changes, whether body + lm_head reproduce the model's logits)
    "llama": ("llama", {}, True),
    "gemma3-softcap": ("gemma3", {"final_logit_softcapping": 5.0}, True),
    "opt": ("opt", {}, True),
    "gpt2": ("gpt2", {}, True),
    "bert-mlm": ("bert", {}, False),  # a transform precedes the vocabulary projection: whole forward per window
    # a softcap the model's forward does not apply: the split fails its probe and the model runs whole
    "llama-unused-softcap": ("llama", {"final_logit_softcapping": 5.0}, False),
}


@pytest.mark.parametrize("slice_elements", [None, 300 * 7], ids=["one-slice", "slices-of-7"])
@pytest.mark.parametrize("case", list(CASES))
def test_sliced_evaluation_equals_whole_batch_logits(case, slice_elements, monkeypatch):
    family, config, splits = CASES[case]
    if slice_elements is not None:  # 7 positions per slice: 40 = 5 x 7 + 5, a short last slice
        monkeypatch.setattr(eval_logits, "SLICE_ELEMENTS", slice_elements)
    model, base = tiny_pair(family, **config)
    windows = torch.randint(0, 300, (5, 40), generator=torch.Generator().manual_seed(1))
    probe = windows[:1, :16]
    with torch.no_grad():
        assert (checked_split(model, probe, forward(model, probe).logits) is not None) == splits
    causal = family != "bert"
    got = evaluate_windows(model, windows, base, batch_size=2, causal=causal, quiet=True)
    want = reference_figures(model, windows, base, batch_size=2, causal=causal)
    assert got["eval_windows"] == 5 and got["eval_tokens"] == 200
    assert set(got) - {"eval_windows", "eval_tokens"} == set(want)
    for key in set(want) - {"windows"}:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key
    assert set(got["windows"]) == set(want["windows"])
    for key, values in want["windows"].items():  # stored with 6 significant digits
        assert got["windows"][key] == pytest.approx(values, rel=2e-5, abs=1e-9), key
    alone = evaluate_windows(model, windows, None, batch_size=2, causal=causal, quiet=True)
    assert alone.get("perplexity") == got.get("perplexity") and "kl_divergence" not in alone


_MEASURE = textwrap.dedent(
    """
    import copy, json, torch, transformers as tf
    from compressor.eval.metrics import evaluate_windows

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.LlamaForCausalLM(config).eval()
    base = copy.deepcopy(model)
    windows = torch.randint(0, 262144, (4, 128), generator=torch.Generator().manual_seed(0))
    evaluate_windows(model, windows[:1, :8], base, 4, quiet=True)  # one-time allocations (threads, kernels)
    peaks = {}
    for name, reference in (("kl", base), ("no_kl", None)):
        before = status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark starts again from the current resident set
        figures = evaluate_windows(model, windows, reference, batch_size=4, quiet=True)
        assert figures["perplexity"] > 0 and (reference is None) == ("kl_divergence" not in figures)
        peaks[name] = status("VmHWM:") - before
    print(json.dumps(peaks))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_evaluation_peak_memory_does_not_scale_with_vocabulary_times_batch():
    """A 262k vocabulary, 4 windows of 128 tokens in one batch: whole-batch logits would be 512 MiB per tensor
    (the straightforward evaluation held about six such tensors at once, 3 GB with KL); the peak stays far below
    one of them (about 100 MB measured with KL, most of it the slice's logits and the allocator's slack)."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    whole_batch_logits = 4 * 128 * 262144 * 4  # bytes of one float32 [batch, seq, vocab] tensor
    for name, peak in peaks.items():
        assert peak < whole_batch_logits, (name, peak / 2**20)
