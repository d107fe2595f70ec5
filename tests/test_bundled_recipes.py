"""Bundled recipes: shipped inside the package, resolved by name from any directory, listed by `compress recipes`;
checked from a directory outside the checkout and from a wheel installed on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml
from test_cli import assert_user_error, run_cli

from compressor.recipe import bundled_recipes, find_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def test_every_recipe_of_the_checkout_is_bundled():
    assert list(bundled_recipes()) == SHIPPED
    assert all(p.read_bytes() == (ROOT / "recipes" / p.name).read_bytes() for p in bundled_recipes().values())


def test_compress_recipes_lists_each_with_one_line():
    code, err, out = run_cli("recipes")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == SHIPPED
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines), out  # a name and its summary


@pytest.mark.parametrize("name", ["w4-layerwise", "w4-layerwise.yaml", "recipes/w4-layerwise.yaml"])
def test_bundled_names_resolve_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout
    assert find_recipe(name) == bundled_recipes()["w4-layerwise"]
    code, err, out = run_cli("--recipe", name, "--print-recipe")
    assert code == 0, err
    assert yaml.safe_load(out)["passes"][0]["type"] == "allocate_bits"


def test_an_existing_path_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("w4-gptq.yaml").write_text("passes: [{type: quantize, method: rtn}]\n")
    code, err, out = run_cli("--recipe", "w4-gptq.yaml", "--print-recipe")
    assert code == 0, err
    assert yaml.safe_load(out)["passes"][0]["method"] == "rtn"  # the local file, not the bundled GPTQ recipe


def test_unknown_names_suggest_the_closest_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err, _ = run_cli("--recipe", "w4-layerwse", "--print-recipe")
    assert_user_error(code, err, "recipe file not found: w4-layerwse", "did you mean w4-layerwise")
    code, err, _ = run_cli("--recipe", "elsewhere/w4-gptq.yaml", "--print-recipe")  # a path: no bundled fallback
    assert_user_error(code, err, "recipe file not found: elsewhere/w4-gptq.yaml", "compress recipes")
    code, err, _ = run_cli("--recipe", str(tmp_path), "--print-recipe")
    assert_user_error(code, err, "is a directory")


def _site_packages(env: Path) -> Path:
    return next((env / "lib").glob("python3*/site-packages"))


def test_a_built_wheel_carries_the_recipes_and_calibration_text(tmp_path):
    """pip-installed users have no checkout: the wheel itself must hold the recipes. The wheel (built without the C++
    extension, which is not what this checks) goes into a fresh venv that sees the test venv's dependencies but not
    its editable install of compressor."""
    env = dict(os.environ, COMPRESSOR_NO_EXT="1")
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    wheel = next(wheel_dir.glob("compressor-*.whl"))
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    deps = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (_site_packages(fresh) / "deps.pth").write_text(f"{deps}\n")  # dependencies only: a .pth line runs no .pth
    python = fresh / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(_site_packages(fresh)), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import compressor.recipe as r, sys; "
        "print(r.__file__); print(r.find_recipe('w4-layerwise')); print(len(r.bundled_recipes()))"
    )
    out = subprocess.run([str(python), "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    module, found, count = out.split()
    site = str(_site_packages(fresh))
    assert module.startswith(site) and found.startswith(site), out  # from the wheel, not the checkout
    assert int(count) == len(SHIPPED)
    listed = subprocess.run(
        [str(python), "-c", "from compressor.cli import main; main()", "recipes"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0 and "w4-layerwise" in listed.stdout, listed.stderr
    # the calibration text and its held-out evaluation split ship with it (the default recipes need both)
    texts = subprocess.run(
        [
            str(python),
            "-c",
            "from compressor.calibration.data import builtin_dir, heldout_dir; "
            "print(builtin_dir()); print(len(list(builtin_dir().glob('*.txt')))); "
            "print(len(list(heldout_dir().glob('*.txt'))))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert texts.returncode == 0, texts.stderr
    folder, n_calibration, n_heldout = texts.stdout.split()
    assert folder.startswith(site), texts.stdout
    assert int(n_calibration) == len(list((ROOT / "calibration_data").glob("*.txt")))
    assert int(n_heldout) == len(list((ROOT / "calibration_data" / "heldout").glob("*.txt"))) > 0
