"""Kronecker-factored Fisher statistics of every block linear, from one forward + backward sweep.

For a linear y = W x, a weight error dW changes the outputs by dy = dW x. To second order, the KL divergence of
the model's next-token distribution from the unquantized one is 0.5 E[(g . dy)^2], where g is the gradient of
log p(y_hat) w.r.t. the layer output with y_hat sampled from the model itself (the Fisher identity). Assuming g
and x independent (K-FAC) this is

    KL(dW) ~= 0.5 * tr(G dW H dW^T),   G = E[g g^T] (out x out),   H = E[x x^T] (in x in),

with expectations over calibration tokens. Approximated: cross-token and cross-layer terms are dropped (each
layer's error is scored alone, contributions add up), and the statistics come from the unquantized model.
Tokens whose input norm exceeds `token_clip` x the sample's median enter H capped: those are attention-sink
"massive activation" tokens, whose outputs barely move the loss (small g), which the independence assumption
would otherwise pair with their huge x (measured on SmolLM2 layer 28 down_proj: 9x over-predicted KL).
G is kept in bfloat16 (half the memory; its rounding is far below the estimate's own error): each sample's product
is rounded to bfloat16 once and summed there. With `compute_dtype` bfloat16 (calibration.dtype auto on CPUs with
AMX/AVX512-BF16) the forward runs under autocast and every Gram product takes bfloat16 inputs with float32
accumulation (H: `GramStat`, as in calibration).
The sweep also records each block's LIM score (negative cosine of block input and output).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.engine import GramStat, return_free_memory
from ..quant.linalg import fixed_order_sum
from ..structure.metrics import CosineMean, lim_score


@dataclass
class FisherStats:
    """H per input-sharing group (keyed by its first linear, float32), G per linear (bfloat16), block LIM scores."""

    h: dict[str, torch.Tensor] = field(default_factory=dict)
    g: dict[str, torch.Tensor] = field(default_factory=dict)
    h_key: dict[str, str] = field(default_factory=dict)  # linear -> key of its H
    lim: list[float] = field(default_factory=list)
    tokens: int = 0

    def input_gram(self, name: str) -> torch.Tensor:
        return self.h[self.h_key[name]]


def collect_fisher(
    model: nn.Module,
    blocks: nn.ModuleList,
    prefixes: list[str],
    groups: list[tuple[str, ...]],
    ids: torch.Tensor,
    seed: int = 0,
    quiet: bool = False,
    backward: bool = True,
    token_clip: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> FisherStats:
    """Sweep `ids` [samples, seq] one sample at a time; returns normalised (per-token) statistics.

    `groups` are the adapter's input-sharing linear groups (names relative to a block). Statistics are in the
    [out, in] orientation whatever the module stores (GPT-2's Conv1D hooks see the same x and y). With
    `backward=False` only the forward runs and only the LIM scores are filled.

    Steps: hooks on the linears (H and G, with `backward`) and on the blocks (LIM); every parameter frozen (the
    gradient flows from the embeddings' output instead); per sample a forward, plus a backward of the log-probability
    of tokens sampled from the model itself; then the sums divided by the token count.
    """
    stats = FisherStats()
    h_stats: dict[str, GramStat] = {}
    gen = torch.Generator().manual_seed(seed)
    cosines = [CosineMean() for _ in blocks]
    handles = []
    if backward:
        handles += _register_linear_hooks(blocks, prefixes, groups, stats, h_stats, token_clip, compute_dtype)
    handles += [block.register_forward_hook(_lim_hook(c), with_kwargs=True) for block, c in zip(blocks, cosines)]
    if backward:
        embed = model.get_input_embeddings()
        handles.append(embed.register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for row in tqdm(ids, desc="sensitivity (fisher)", unit="sample", disable=quiet):
            x = row.unsqueeze(0)
            if backward:
                _forward_backward(model, x, gen, compute_dtype)
                return_free_memory()  # the sample's activations are gone: keep them from ratcheting the resident set
            else:
                with torch.inference_mode():
                    model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
            stats.tokens += x.numel()
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    _normalise(stats, h_stats)
    stats.lim = [lim_score(c.cosine) for c in cosines]
    return stats


def _register_linear_hooks(
    blocks: nn.ModuleList,
    prefixes: list[str],
    groups: list[tuple[str, ...]],
    stats: FisherStats,
    h_stats: dict[str, GramStat],
    token_clip: float | None,
    compute_dtype: torch.dtype,
) -> list:
    """A `_linear_hook` on every grouped linear of every block (recording which H each one reads); the handles."""
    handles = []
    for bi, block in enumerate(blocks):
        for group in groups:
            key = f"{prefixes[bi]}.{group[0]}"
            for local in group:
                name = f"{prefixes[bi]}.{local}"
                stats.h_key[name] = key
                hook = _linear_hook(stats, h_stats, name, key, token_clip, compute_dtype)
                handles.append(block.get_submodule(local).register_forward_hook(hook))
    return handles


def _forward_backward(model: nn.Module, x: torch.Tensor, gen: torch.Generator, compute_dtype: torch.dtype) -> None:
    """One sample's forward, and the backward of the log-probability of tokens drawn from the model's own output
    distribution (the hooks collect the statistics on the way)."""
    with torch.enable_grad():
        with torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        sampled = _sample_tokens(logp.detach(), gen)
        logp.gather(1, sampled).sum().backward()


def _normalise(stats: FisherStats, h_stats: dict[str, GramStat]) -> None:
    """The swept sums as per-token means: H from the Gram statistics (float32), G in place (bfloat16)."""
    for k, stat in h_stats.items():
        stats.h[k] = (stat.h / max(stats.tokens, 1)).to(torch.float32)
    for k in stats.g:  # one float32 temporary at a time: G stays bfloat16 (half the memory of the sweep's result)
        stats.g[k] = (stats.g[k].float() / max(stats.tokens, 1)).to(torch.bfloat16)


def _linear_hook(
    stats: FisherStats,
    h_stats: dict[str, GramStat],
    name: str,
    key: str,
    token_clip: float | None,
    product_dtype: torch.dtype,
):
    def add_g(grad: torch.Tensor) -> None:
        g = _sample_gram(grad.detach(), product_dtype)
        if name in stats.g:
            stats.g[name] += g
        else:
            stats.g[name] = g

    def hook(module, inputs, output):
        if name == key:  # the group's members share this input: accumulate it once
            x = inputs[0].detach()
            stat = h_stats.setdefault(key, GramStat(x.shape[-1], token_clip, product_dtype, track_abs=False))
            stat.add(x)
        if output.requires_grad:
            output.register_hook(add_g)

    return hook


def _sample_gram(grad: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    """One sample's g^T g [out, out] in bfloat16, the dtype G accumulates in. A bfloat16 product with a bfloat16
    result (oneDNN: float32 accumulation, one rounding) equals a float32-result product rounded once, and runs at
    bfloat16 speed where MKL's float32-result bfloat16 GEMM does not (measured 4x on an AMD Zen 5)."""
    with torch.autocast(grad.device.type, enabled=False):
        x = grad.reshape(-1, grad.shape[-1])
        if product_dtype == torch.bfloat16:
            x = x.to(torch.bfloat16)
            return torch.mm(x.t(), x)
        x = x.float()
        return torch.mm(x.t(), x).to(torch.bfloat16)


def _sample_tokens(logp: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of log-probabilities [tokens, vocab], drawn from exp(logp) by inverse CDF (cumsum +
    searchsorted: the same distribution as torch.multinomial at a fraction of its cost on a 49k vocabulary)."""
    cdf = logp.exp().cumsum_(dim=1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1)


def _lim_hook(cosine: CosineMean):
    def hook(module, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = output[0] if isinstance(output, tuple) else output
        cosine.add(h_in.detach(), h_out.detach())

    return hook


def predicted_kl(g: torch.Tensor, h: torch.Tensor, dw: torch.Tensor) -> float:
    """0.5 tr(G dW H dW^T): the K-FAC estimate of the per-token KL increase caused by weight error dW [out, in]
    (float32 products, summed in float64 in a fixed order; a bfloat16 G is widened first)."""
    return 0.5 * fixed_order_sum((g.float() @ dw) * (dw @ h))
