"""The run report: report.json (stable keys), a human summary, plots, and the model card."""

from __future__ import annotations

import json
from pathlib import Path

from compressor.eval.bootstrap import interval_parts

REPORT_VERSION = 2  # 2: `plan` holds every decision of the run (layers, ignore, blocks, awq, dtype)

_PART_LABELS = {
    "quantized_weights": "quantized weights",
    "quantization_params": "scales and zero points",
    "embeddings": "embeddings and head",
    "float_linears": "float linears",
    "other": "norms and biases",
    "lowrank_compensation": "low-rank compensation (lora/)",
}
_PLOTS = {  # file -> caption, in the order the summary and the model card show them
    "size.png": "size by part",
    "quality.png": "quality against the base model, per evaluation window",
    "layers.png": "format (or rank) per layer",
    "scores.png": "block importance scores",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write the figure (no software stamp, so same inputs give the same bytes) and free it."""
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None}, bbox_inches="tight")  # keeps a legend placed outside the axes
    _pyplot().close(fig)


def _file_sizes(size: dict) -> str:
    written = [
        (size.get("artifact_bytes"), "safetensors"),
        (size.get("onnx_bytes"), "ONNX"),
        (size.get("gguf_bytes"), "GGUF"),
    ]
    return "; ".join(f"{label} {nbytes / 1e6:.1f} MB" for nbytes, label in written if nbytes) or "no weights written"


def _percent(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction >= 0.005 else "<1%"


def summary_lines(report: dict) -> list[str]:
    """A short human-readable summary (printed at the end of a run and placed in the model card).

    One line per part the run has: model and quantized size, size against the base, bit allocation, low-rank
    compensation, activation-aware scaling, group-size fallbacks, perplexity, KL, the greedy sample, timings.
    """
    size, metrics = report.get("size", {}), report.get("metrics", {})
    lines = _model_lines(report, size)
    if size.get("base_bytes") and size.get("artifact_bytes"):
        lines.append(_size_line(size))
    if report.get("allocation"):
        lines.append(_allocation_line(report["allocation"]))
        if report["allocation"].get("check") or report["allocation"].get("fallback"):
            lines.append(_allocation_check_line(report["allocation"]))
    if report.get("lowrank"):
        lines.append(_lowrank_line(report, size))
    if report.get("lowrank_decomposition"):
        lines.append(_decomposition_line(report["lowrank_decomposition"]))
    if report.get("awq"):
        scaled = [g for g in report["awq"] if g["alpha"] > 0]
        lines.append(f"activation-aware scaling: {len(scaled)} of {len(report['awq'])} input groups scaled")
    if report.get("group_fallbacks"):
        lines.append(f"group-size fallbacks: {len(report['group_fallbacks'])} layers (see report.json)")
    lines += _quality_lines(metrics)
    t = report.get("timings", {})
    if t:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return lines


def _model_lines(report: dict, size: dict) -> list[str]:
    """The model (source, family, parameters), and its quantized layers with their bits per weight and files."""
    return [
        f"model: {report['model']['source']} ({report['model']['family']}, {size.get('total_params', 0):,} params)",
        f"quantized layers: {size.get('quantized_layers', 0)} at {size.get('quantized_bits_per_weight') or 0:.3f} "
        "bits/weight incl. scales"
        + (" and low-rank compensation" if report.get("lowrank") else "")
        + "; "
        + _file_sizes(size),
    ]


def _size_line(size: dict) -> str:
    """Compression against the uncompressed model, and the artifact's bytes by part."""
    parts, total = size["breakdown_bytes"], sum(size["breakdown_bytes"].values())
    by_part = ", ".join(f"{label} {_percent(parts[k] / total)}" for k, label in _PART_LABELS.items() if parts.get(k))
    return (
        f"size: {size['base_bytes'] / size['artifact_bytes']:.2f}x smaller than the uncompressed model at "
        f"{size['dense_dtype']} ({size['base_bytes'] / 1e6:.3g} MB); artifact by part: {by_part}"
    )


def _allocation_line(alloc: dict) -> str:
    """Bits used of the budget, and how many units took each format."""
    counts: dict[str, int] = {}
    for unit in alloc["units"]:
        counts[unit["format"]] = counts.get(unit["format"], 0) + 1
    return (
        f"allocate_bits ({alloc['method']}): {alloc['used_bits_per_weight']:.3f} of "
        f"{alloc['budget_bits_per_weight']:.3f} bits/weight; " + ", ".join(f"{k} x{v}" for k, v in counts.items())
    )


def _allocation_check_line(alloc: dict) -> str:
    """The sensitivity model's rank correlation on its probes and the fallback's decision, as the run made them."""
    parts = []
    check, fallback = alloc.get("check"), alloc.get("fallback")
    if check:
        rho = check["rank_correlation"]
        shown = "undefined" if rho is None else f"{rho:.2f}"
        verdict = "" if check["passed"] else f", below {check['min_rank_correlation']:g}"
        parts.append(f"predicted vs measured KL on {len(check['probes'])} probe linears: Spearman {shown}{verdict}")
    if fallback:
        best = min(fallback["uniform"].items(), key=lambda kv: kv[1], default=None)
        if fallback["used"]:
            parts.append(f"fallback: uniform {best[0]} (held-out KL {best[1]:.4g} < mix {fallback['mix_kl']:.4g})")
        else:
            against = f", best uniform {best[0]} {best[1]:.4g}" if best else " (no uniform allocation fits)"
            parts.append(f"mix kept (held-out KL {fallback['mix_kl']:.4g}{against})")
    return "allocation check: " + "; ".join(parts)


def _lowrank_line(report: dict, size: dict) -> str:
    """The LoRA compensation's ranks, cost and the median share of quantization error it removes."""
    fits = report["lowrank"]
    removed = sorted(f["error_removed"] for f in fits)
    ranks = sorted(f["rank"] for f in fits)
    shown = (
        f"rank {ranks[0]}"
        if ranks[0] == ranks[-1]
        else f"ranks {ranks[0]}-{ranks[-1]} (median {ranks[len(ranks) // 2]})"
    )
    if report.get("lowrank_allocation"):
        shown += f" allocated under {report['lowrank_allocation']['budget_bits_per_weight']:g} bits/weight"
    return (
        f"low-rank compensation: {shown} on {len(fits)} layers "
        f"({size.get('compensation_bits_per_weight') or 0:.3f} bits/weight, PEFT LoRA in lora/); it removes a "
        f"median {removed[len(removed) // 2]:.0%} of each layer's quantization output error on calibration data"
    )


def _interval_lines(metrics: dict) -> list[str]:
    """The evaluation text (held out or not) and the 95% intervals of the perplexity change and the KL."""
    lines = []
    text = metrics.get("evaluation_text") or {}
    if text:
        if text.get("overlaps_calibration"):
            where = "OVERLAPS the calibration text: these figures flatter calibrated methods"
        elif "overlaps_calibration" in text:
            where = "held out: no overlap with the calibration text"
        else:
            where = "no calibration in this run"
        lines.append(f"evaluated on {text['source']} ({where})")
    parts = interval_parts(metrics.get("intervals") or {}, pct_digits=2, kl_digits=5)
    if parts:
        lines.append(
            f"95% intervals (paired bootstrap over {metrics.get('eval_windows', '?')} windows): " + "; ".join(parts)
        )
    return lines


def _quality_lines(metrics: dict) -> list[str]:
    """Perplexity (against the base), KL to the base (or, for a headless encoder, the cosine of its embeddings to
    the base's), and the greedy sample's decode speed (or its failure)."""
    lines = []
    if "perplexity" in metrics:
        base = metrics.get("base_perplexity")
        rel = f" ({(metrics['perplexity'] / base - 1) * 100:+.1f}% vs base {base:.3f})" if base else ""
        lines.append(f"perplexity: {metrics['perplexity']:.3f}{rel} on {metrics['eval_tokens']} tokens")
    if "kl_divergence" in metrics:
        lines.append(f"KL to base: {metrics['kl_divergence']:.5f}; top-1 agreement {metrics['top1_agreement']:.2%}")
    if "embedding_cosine" in metrics:
        lines.append(
            f"embedding cosine to base: {metrics['embedding_cosine']:.6f} mean, {metrics['embedding_cosine_min']:.6f} "
            f"lowest over {metrics['eval_windows']} windows (mean-pooled last hidden states)"
        )
    lines += _interval_lines(metrics)
    sample, base_sample = metrics.get("sample"), metrics.get("base_sample")
    if sample and sample.get("decode_tokens_per_s"):
        rate = sample["decode_tokens_per_s"]
        line = f"greedy sample: {rate:.1f} tok/s decode ({sample['new_tokens']} tokens, compressor.load int8-decode)"
        if base_sample and base_sample.get("decode_tokens_per_s"):
            base_rate = base_sample["decode_tokens_per_s"]
            line += f"; base model {base_rate:.1f} tok/s ({rate / base_rate:.2f}x)"
        lines.append(line)
    elif sample and "error" in sample:
        lines.append(f"greedy sample failed: {sample['error']}")
    return lines


def _decomposition_line(dec: dict) -> str:
    """How many linears the decomposition factored, their ranks and the parameters kept."""
    ranks = sorted(v["rank"] for v in dec["layers"].values() if v["rank"] is not None)
    shown = f"ranks {ranks[0]}-{ranks[-1]} (median {ranks[len(ranks) // 2]})" if ranks else "no layer factored"
    return (
        f"low-rank decomposition ({dec['method']}, {dec['allocation']} allocation): {len(ranks)} of "
        f"{len(dec['layers'])} linears factored, {shown}; {dec['params_kept']:.1%} of their parameters kept"
    )


def _plot_per_layer(values: dict[str, float], ylabel: str, title: str, path: Path) -> bool:
    """One value per layer over depth (execution order), one marker series per layer type."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    by_type: dict[str, list[tuple[int, float]]] = {}
    for i, (name, value) in enumerate(values.items()):
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append((i, value))
    for kind, pts in sorted(by_type.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=3, label=kind)
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=4)
    _save(fig, path)
    return True


def plot_ranks(dec: dict, path: Path) -> bool:
    """Rank per decomposed layer over depth as a share of its break-even rank (1: kept dense), per layer type."""
    from compressor.quant.lowrank import breakeven_rank

    shares = {
        name: 1.0 if layer["rank"] is None else layer["rank"] / max(breakeven_rank(*layer["shape"]), 1)
        for name, layer in dec["layers"].items()
    }
    return _plot_per_layer(shares, "rank / break-even rank", "rank per layer (1 = kept dense)", path)


def plot_layers(report: dict, path: Path) -> bool:
    """Bits per weight of every quantized layer over depth, one marker series per layer type (a decomposition
    without quantization: rank per layer)."""
    layers = report.get("plan", {}).get("layers", {})
    if not layers and report.get("lowrank_decomposition"):
        return plot_ranks(report["lowrank_decomposition"], path)
    if not layers:
        return False
    bits = {
        name: (lp["storage_bits"] + lp.get("compensation_bits", 0)) / (lp["shape"][0] * lp["shape"][1])
        for name, lp in layers.items()
    }
    return _plot_per_layer(bits, "bits / weight (incl. scales, LoRA)", "format per layer", path)


def plot_size(report: dict, path: Path) -> bool:
    """Two stacked bars: the uncompressed model at the artifact's dense dtype, and the artifact by part."""
    size = report.get("size", {})
    parts = size.get("breakdown_bytes")
    if not parts or not size.get("base_bytes"):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 2.6), dpi=100)
    base_mb = size["base_bytes"] / 1e6
    ax.barh([1], [base_mb], color="0.75")
    ax.text(base_mb, 1, f" {base_mb:.1f} MB", va="center", fontsize=8)
    left = 0.0
    for key, label in _PART_LABELS.items():  # fixed order (report.json sorts its keys)
        if parts.get(key):
            ax.barh([0], [parts[key] / 1e6], left=left, label=label)
            left += parts[key] / 1e6
    ax.text(left, 0, f" {size['artifact_bytes'] / 1e6:.1f} MB", va="center", fontsize=8)
    ax.set_yticks([0, 1], ["artifact", f"uncompressed\n({size['dense_dtype']})"])
    ax.set_xlim(0, base_mb * 1.15)
    ax.set_xlabel("MB (10^6 bytes)")
    ax.set_title("size by part")
    ax.legend(fontsize=7, ncol=len(parts), loc="upper center", bbox_to_anchor=(0.5, -0.45), frameon=False)
    _save(fig, path)
    return True


_SPREAD_PANELS = {  # per-window figure -> (title, x label) of its histogram in quality.png
    "kl_divergence": ("KL to base per window", "mean KL(base || compressed) in the window"),
    "embedding_cosine": ("embedding distance to base per window", "1 - cosine of mean-pooled embeddings to the base's"),
}


def plot_quality(report: dict, path: Path) -> bool:
    """Per evaluation window: perplexity change against the base (a point per window) and the spread of KL (or,
    for a headless encoder, of the embedding distance to the base: 1 - cosine)."""
    windows = report.get("metrics", {}).get("windows", {})
    panels = [k for k in ("base_perplexity", "kl_divergence", "embedding_cosine") if windows.get(k)]
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=100, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "base_perplexity":
            base = windows["base_perplexity"]
            change = [(ours / b - 1) * 100 for ours, b in zip(windows["perplexity"], base)]
            ax.scatter(base, change, s=6, alpha=0.6)
            ax.axhline(0, color="0.4", lw=0.8, ls="--")
            ax.set_xlabel("base model perplexity of the window")
            ax.set_ylabel("compressed vs base (%)")
            ax.set_title("perplexity change per window")
        else:
            values = windows[panel]
            if panel == "embedding_cosine":  # a distance: the cosines agree in their first digits
                values = [1 - v for v in values]
            title, xlabel = _SPREAD_PANELS[panel]
            ax.hist(values, bins=min(40, max(5, len(values) // 3)))
            median = sorted(values)[len(values) // 2]
            ax.axvline(median, color="0.3", ls="--", lw=0.8, label=f"median {median:.4g}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("windows")
            ax.set_title(title)
            ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_sections(folder: Path) -> list[str]:
    """Markdown image lines for the plots present in `folder` (the run's and a pass's, e.g. scores.png)."""
    return [f"![{caption}]({name})" for name, caption in _PLOTS.items() if (folder / name).is_file()]


def allocation_table(report: dict) -> list[str]:
    """Markdown table: per layer type, how many layers took each format (and why: the predicted KL saved)."""
    alloc = report.get("allocation")
    if not alloc:
        return []
    formats = alloc["candidates"]
    by_type: dict[str, dict[str, int]] = {}
    for unit in alloc["units"]:
        kind = unit["name"].rsplit(".", 1)[-1] if alloc["granularity"] == "linear" else "block"
        row = by_type.setdefault(kind, dict.fromkeys(formats, 0))
        row[unit["format"]] += 1
    lines = ["", "## Bit allocation", "", "| layer type | " + " | ".join(formats) + " |"]
    lines.append("|---" * (len(formats) + 1) + "|")
    for kind, row in by_type.items():
        lines.append(f"| {kind} | " + " | ".join(str(row[f]) for f in formats) + " |")
    if alloc.get("predicted_kl") is not None:
        lines += ["", f"Predicted KL of the allocation (Fisher estimate, sum over layers): {alloc['predicted_kl']:.5f}"]
    return lines


def sample_section(report: dict) -> list[str]:
    """Markdown: the prompt and the greedy continuations of the compressed and the base model."""
    metrics = report.get("metrics", {})
    sample, base_sample = metrics.get("sample") or {}, metrics.get("base_sample") or {}
    if "text" not in sample:
        return []

    def block(text: str) -> list[str]:
        fence = "`" * 3
        return [fence + "text", text.replace(fence, "'''").strip(), fence]

    prompt = sample["prompt"].replace("`", "'")
    lines = ["", "## Greedy sample", "", f"Prompt: `{prompt}`", "", "Compressed:", *block(sample["text"])]
    if "text" in base_sample:
        lines += ["", "Base model:", *block(base_sample["text"])]
    return lines


def write_report(report: dict, folder: Path) -> None:
    """report.json, summary.md and the plots (size.png, quality.png, layers.png) into `folder`."""
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    plot_size(report, folder / "size.png")
    plot_quality(report, folder / "quality.png")
    plot_layers(report, folder / "layers.png")
    text = ["# Compression report", "", *[f"- {line}" for line in summary_lines(report)]]
    for image in plot_sections(folder):
        text += ["", image]
    text += allocation_table(report)
    text += sample_section(report)
    (folder / "summary.md").write_text("\n".join(text) + "\n")


def _plots_section(folder: Path) -> list[str]:
    images = plot_sections(folder)
    return ["", "## Plots", *[line for image in images for line in ("", image)]] if images else []


def _consumers(report: dict) -> str:
    """Which tools load the artifact."""
    if report.get("lowrank_decomposition", {}).get("layers") and any(
        v["rank"] is not None for v in report["lowrank_decomposition"]["layers"].values()
    ):
        return (
            "Its decomposed layers (`<layer>.lowrank_A` / `lowrank_B`, ranks in config.json under "
            "`compressor_lowrank`) load with `compressor.load(path)` only; transformers and vLLM need a dense copy "
            "first: `compress densify PATH DENSE` (the products B A, no size gain)."
        )
    text = "Loads with `transformers` (with `compressed-tensors` installed) and vLLM, or `compressor.load(path)`."
    if report.get("size", {}).get("gguf_bytes"):
        text += (
            " `model.gguf` runs in llama.cpp (`llama-cli -m model.gguf -p 'Hello'`, or Ollama / LM Studio), its "
            "Q4_0 / Q8_0 blocks holding the same codes as the safetensors."
        )
    return text


def _lora_usage(report: dict) -> list[str]:
    """How to apply the low-rank compensation, when the artifact has one (without it the quality is lower)."""
    if not report.get("lowrank"):
        return []
    return [
        "",
        "The quantization error is partly corrected by a LoRA adapter in `lora/` (PEFT layout); the figures below "
        "include it. Apply it in transformers (with `peft` installed) or vLLM (`--enable-lora`); "
        "`compressor.load` applies it itself:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, CompressedTensorsConfig",
        "config = CompressedTensorsConfig(dequantize=True)  # PEFT wraps float linears",
        "model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)",
        'model.load_adapter(f"{path}/lora")',
        "```",
    ]


def write_model_card(report: dict, recipe_yaml: str, folder: Path) -> None:
    """README.md model card: hub metadata (base model when known), what was done, quality vs base, the recipe."""
    from huggingface_hub import ModelCardData

    source, base_model = report["model"]["source"], report["model"].get("base_model")
    metadata = ModelCardData(
        library_name="transformers",
        tags=["compressed-tensors", "compressor", "quantized"],
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,  # the hub's model tree links the two
    )
    card = [
        "---",
        metadata.to_yaml(),
        "---",
        f"# {Path(source).name} (compressed)",
        "",
        f"Compressed from `{source}` with compressor {report['compressor_version']}. " + _consumers(report),
        *_lora_usage(report),
        "",
        "## Summary",
        *[f"- {line}" for line in summary_lines(report)],
        "",
        *sample_section(report),
        "",
        *_plots_section(folder),
        "",
        "## Recipe",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
    ]
    (folder / "README.md").write_text("\n".join(card) + "\n")
