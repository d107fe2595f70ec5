"""The plan is the record of every decision: report.json's `plan`, and what the artifact writers read."""

import json
import subprocess
import sys

from conftest import small_recipe
from safetensors import safe_open

import compressor


def test_report_plan_records_every_decision(tiny_model_dir, calib_file, tmp_path):
    recipe = small_recipe(calib_file, {"bits": 4, "group_size": 32})
    recipe["passes"] = [
        {"type": "remove_blocks", "blocks": [1]},
        {**recipe["passes"][0], "awq": True, "ignore": ["mlp\\.down_proj"]},
    ]
    recipe["evaluate"] = None
    out = tmp_path / "out"
    result = compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=out, quiet=True)
    plan = json.loads((out / "report.json").read_text())["plan"]

    assert plan["dtype"] == "float32"
    assert plan["blocks"] == [
        {
            "pass_name": "remove_blocks",
            "depth_before": 3,
            "depth_after": 2,
            "removed_blocks": [1],
            "merged_windows": [],
            "zeroed": [],
        }
    ]
    # the ignored linears of the two remaining blocks, and the float head, which loaders must leave alone
    assert plan["ignore"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    assert set(plan["layers"]) == set(result.plan.layers) and len(plan["layers"]) == 2 * 6
    layer = plan["layers"]["model.layers.0.self_attn.q_proj"]
    assert (layer["format"], layer["bits"], layer["group_size"], layer["strategy"]) == ("int4-g32-sym", 4, 32, "group")
    assert plan["awq"] and all(f["alpha"] > 0 and f["folded_into"].startswith("model.layers.") for f in plan["awq"])

    # the writer took the ignore list and the targets from the plan
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == sorted(plan["ignore"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.down_proj.weight" in keys and "model.layers.0.mlp.up_proj.weight_packed" in keys

    roles = result.plan.size_roles()
    assert roles["model.layers.0.mlp.down_proj"] == "float_linears" and roles["lm_head"] == "embeddings"
    assert roles["model.layers.0.mlp.up_proj"] == "quantized" and roles["model.embed_tokens"] == "embeddings"


def test_package_root_loads_names_and_submodules_on_first_use():
    code = (
        "import sys, compressor\n"
        "assert 'compressor.api' not in sys.modules\n"
        "assert compressor.api.resolve_recipe and compressor.compress and compressor.load and compressor.Recipe\n"
        "assert 'compress' in dir(compressor)\n"
        "try:\n    compressor.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
