"""The artifact's low-rank compensation as a PEFT LoRA adapter (`lora/` beside the compressed weights).

Layout, as PEFT saves it: `lora/adapter_model.safetensors` holds `base_model.model.<module>.lora_A.weight` [r, in]
and `...lora_B.weight` [out, r]; `lora/adapter_config.json` targets the corrected modules by full name with
lora_alpha equal to each rank (scaling 1), so y = W_q x + B (A x). transformers (`model.load_adapter`), PEFT and
vLLM's LoRA loader read this layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ModelError

LORA_DIR = "lora"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def tensor_names(module: str) -> tuple[str, str]:
    """The adapter's keys of `module`'s down (lora_A) and up (lora_B) factors."""
    return f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"


def write_lora(
    folder: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    task_type: str | None,
    fan_in_fan_out: bool = False,
    base_model: str | None = None,
) -> list[str]:
    """Write module -> (down [r, in], up [out, r]) as a PEFT LoRA adapter in `folder/lora` (tensors kept in their
    dtype); returns the files."""
    out = folder / LORA_DIR
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (down, up) in factors.items():
        a, b = tensor_names(name)
        tensors[a], tensors[b] = down.contiguous(), up.contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    ranks = {name: down.shape[0] for name, (down, _) in factors.items()}
    r = max(ranks.values())
    odd = {name: k for name, k in ranks.items() if k != r}  # layers narrower than the rank
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": odd,
        "alpha_pattern": odd,
        "target_modules": sorted(factors),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "inference_mode": True,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return [f"{LORA_DIR}/{WEIGHTS_FILE}", f"{LORA_DIR}/{CONFIG_FILE}"]


def read_lora(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down, up) float32 from an artifact's `lora/` adapter; {} when the artifact has none."""
    out = folder / LORA_DIR
    if not (out / CONFIG_FILE).is_file():
        return {}
    try:
        config = json.loads((out / CONFIG_FILE).read_text())
        tensors = load_file(str(out / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as err:  # ValueError: JSON (and UTF-8) decoding
        raise ModelError(f"corrupt LoRA adapter in {out}: {err}", fix="re-run compress to rewrite it") from None
    factors = {}
    for name in config.get("target_modules") or []:
        a, b = tensor_names(name)
        if a not in tensors or b not in tensors:
            raise ModelError(f"LoRA adapter in {out} lacks the factors of '{name}'", fix="re-run compress")
        rank = tensors[a].shape[0]
        alpha = (config.get("alpha_pattern") or {}).get(name, config.get("lora_alpha", rank))
        scaling = alpha / (config.get("rank_pattern") or {}).get(name, config.get("r", rank))
        factors[name] = (tensors[a].to(torch.float32), tensors[b].to(torch.float32) * scaling)
    return factors
