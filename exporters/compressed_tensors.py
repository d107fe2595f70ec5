"""The compressed-tensors `quantization_config` and per-layer tensors for a plan.

Layout (what transformers' and vLLM's compressed-tensors loaders expect):
  int  -> format `pack-quantized`: `<layer>.weight_packed` int32 [N, ceil(K*b/32)], `<layer>.weight_scale`
          [N, G] (G = 1 for channel-wise), `<layer>.weight_shape` int64 [2], and for asymmetric schemes
          `<layer>.weight_zero_point` int32 packed along the output dim [ceil(N*b/32), G].
  fp8  -> format `float-quantized`: `<layer>.weight` float8_e4m3fn [N, K], `<layer>.weight_scale` float32
          ([N, 1] channel, [1] tensor, [ceil(N/bn), ceil(K/bk)] block).
Layers whose scheme differs (e.g. a group size that fell back) get their own config group with explicit
targets; the format is `mixed-precision` when groups use different formats.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from compressor.plan import LayerPlan, Plan, QuantizedWeight
from compressor.quant.formats import SCALE_DTYPES, Fp8Format
from compressor.quant.packing import pack_int32, pack_zero_points


def layer_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The compressed tensors of one layer, keyed by full parameter name."""
    if isinstance(qw.fmt, Fp8Format):
        scale = qw.scale.to(torch.float32)
        return {f"{name}.weight": qw.codes.contiguous(), f"{name}.weight_scale": scale.contiguous()}
    out_f, in_f = qw.shape
    bits = qw.fmt.bits
    tensors = {
        f"{name}.weight_packed": qw.packed if qw.packed is not None else pack_int32(qw.codes, bits),
        f"{name}.weight_scale": qw.scale.to(SCALE_DTYPES[qw.scale_dtype]).contiguous(),
        f"{name}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if qw.zero is not None:
        z = qw.zero.to(torch.int8)
        tensors[f"{name}.weight_zero_point"] = pack_zero_points(z, bits)
    return tensors


def _scheme(layer: LayerPlan) -> dict:
    """The compressed-tensors quantization scheme of one planned layer."""
    fmt = layer.fmt
    if isinstance(fmt, Fp8Format):
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": fmt.strategy, "dynamic": False}
        if fmt.strategy == "block":
            weights["block_structure"] = list(fmt.block)
        kind = "float-quantized"
    else:
        weights = {
            "num_bits": fmt.bits,
            "type": "int",
            "symmetric": fmt.symmetric,
            "strategy": layer.strategy,
            "group_size": fmt.group_size,
            "dynamic": False,
        }
        kind = "pack-quantized"
    return {"weights": weights, "input_activations": None, "output_activations": None, "format": kind}


def _targets(names: list[str], all_linear_names: list[str]) -> list[str]:
    """Compact regex targets: one per layer-name suffix when every layer with that suffix is in `names`."""
    chosen = set(names)
    by_suffix = defaultdict(list)
    for n in all_linear_names:
        by_suffix[re.sub(r"^.*?\.\d+\.", "", n)].append(n)
    targets = []
    covered = set()
    for suffix, members in sorted(by_suffix.items()):
        if len(members) > 1 and all(m in chosen for m in members):
            targets.append(f"re:.*\\.\\d+\\.{re.escape(suffix)}$")
            covered.update(members)
    targets += [f"re:^{re.escape(n)}$" for n in sorted(chosen - covered)]
    return targets


def quantization_config(plan: Plan) -> dict:
    """The `quantization_config` entry of config.json for this plan (its layers, linears and ignore list)."""
    groups: dict[str, list[str]] = defaultdict(list)
    schemes: dict[str, dict] = {}
    for name, layer in sorted(plan.layers.items()):
        scheme = _scheme(layer)
        key = repr(sorted(scheme["weights"].items()))
        schemes[key] = scheme
        groups[key].append(name)
    config_groups = {}
    for i, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
        config_groups[f"group_{i}"] = {"targets": _targets(names, plan.linears), **schemes[key]}
    formats = {g["format"] for g in config_groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(plan.ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }
