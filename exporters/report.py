"""The run report: report.json (stable keys), a human summary, a per-layer plot, and the model card."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_VERSION = 1


def summary_lines(report: dict) -> list[str]:
    """A short human-readable summary (printed at the end of a run and placed in the model card)."""
    size, metrics = report.get("size", {}), report.get("metrics", {})
    lines = [
        f"model: {report['model']['source']} ({report['model']['family']}, {size.get('total_params', 0):,} params)",
        f"quantized layers: {size.get('quantized_layers', 0)} at {size.get('quantized_bits_per_weight', 0):.3f} "
        f"bits/weight incl. scales; artifact {size.get('artifact_bytes', 0) / 1e6:.1f} MB",
    ]
    alloc = report.get("allocation")
    if alloc:
        counts: dict[str, int] = {}
        for unit in alloc["units"]:
            counts[unit["format"]] = counts.get(unit["format"], 0) + 1
        lines.append(
            f"allocate_bits ({alloc['method']}): {alloc['used_bits_per_weight']:.3f} of "
            f"{alloc['budget_bits_per_weight']:.3f} bits/weight; " + ", ".join(f"{k} x{v}" for k, v in counts.items())
        )
    if report.get("awq"):
        scaled = [g for g in report["awq"] if g["alpha"] > 0]
        lines.append(f"activation-aware scaling: {len(scaled)} of {len(report['awq'])} input groups scaled")
    if report.get("group_fallbacks"):
        lines.append(f"group-size fallbacks: {len(report['group_fallbacks'])} layers (see report.json)")
    if "perplexity" in metrics:
        base = metrics.get("base_perplexity")
        rel = f" ({(metrics['perplexity'] / base - 1) * 100:+.1f}% vs base {base:.3f})" if base else ""
        lines.append(f"perplexity: {metrics['perplexity']:.3f}{rel} on {metrics['eval_tokens']} tokens")
    if "kl_divergence" in metrics:
        lines.append(f"KL to base: {metrics['kl_divergence']:.5f}; top-1 agreement {metrics['top1_agreement']:.2%}")
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
    t = report.get("timings", {})
    if t:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return lines


def plot_layers(report: dict, path: Path) -> bool:
    """Bits per weight of every quantized layer over depth, one marker series per layer type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.get("plan", {})
    if not layers:
        return False
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    by_type: dict[str, list[tuple[int, float]]] = {}
    for i, (name, lp) in enumerate(layers.items()):
        kind = name.rsplit(".", 1)[-1]
        bpw = lp["storage_bits"] / (lp["shape"][0] * lp["shape"][1])
        by_type.setdefault(kind, []).append((i, bpw))
    for kind, pts in sorted(by_type.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=3, label=kind)
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("bits / weight (incl. scales)")
    ax.set_title("format per layer")
    ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


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
    """report.json, summary.md and layers.png into `folder`."""
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    has_plot = plot_layers(report, folder / "layers.png")
    text = ["# Compression report", "", *[f"- {line}" for line in summary_lines(report)]]
    if has_plot:
        text += ["", "![format per layer](layers.png)"]
    text += allocation_table(report)
    text += sample_section(report)
    (folder / "summary.md").write_text("\n".join(text) + "\n")


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
        f"Compressed from `{source}` with compressor {report['compressor_version']}. "
        "Loads with `transformers` (with `compressed-tensors` installed) and vLLM, or `compressor.load(path)`.",
        "",
        "## Summary",
        *[f"- {line}" for line in summary_lines(report)],
        "",
        *sample_section(report),
        "",
        "## Recipe",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
    ]
    (folder / "README.md").write_text("\n".join(card) + "\n")
