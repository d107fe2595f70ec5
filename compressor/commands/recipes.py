"""`compress recipes`: list the bundled recipes, one line each."""

from __future__ import annotations

import click


@click.command("recipes")
def recipes_command() -> None:
    """List the recipes shipped with compressor; `compress --recipe NAME` runs one from any directory."""
    from ..recipe import bundled_recipes, recipe_summary

    recipes = bundled_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        click.echo(f"{name:{width}}  {recipe_summary(path)}")
