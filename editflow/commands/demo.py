"""``editflow demo``: rebuild the bundled default model from CounterFact-format records."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import MISSING, fields

import click

from editflow.demo.options import CorpusOptions, TrainOptions


@click.group("demo")
def command() -> None:
    """The bundled default fact model."""


def recipe_options(func: Callable) -> Callable:
    """One ``--option`` per recipe field (TrainOptions, CorpusOptions), defaulting to the recipe's value."""
    for f in reversed([*fields(TrainOptions), *fields(CorpusOptions)]):
        assert f.default is not MISSING
        func = click.option(
            f"--{f.name.replace('_', '-')}",
            f.name,
            type=type(f.default),
            default=f.default,
            show_default=True,
            help=f.metadata.get("help"),
        )(func)
    return func


@click.command("build")
@click.option(
    "--records",
    "records",
    required=True,
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="CounterFact-format JSON file (repeatable; deduplicated by case_id).",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory the model is saved to."
)
@recipe_options
def build(records: tuple[str, ...], out_dir: str, **options) -> None:
    """Train tokenizer and model on --records and save them (with card.json) to --out.

    The defaults are the recipe of the shipped model: with the shipped records they rebuild it."""
    from editflow.demo import build_default_model

    card = build_default_model(list(records), out_dir, **options)
    click.echo(json.dumps({k: card[k] for k in ("n_params", "train_minutes", "steps", "pre_edit")}, indent=2))


command.add_command(build)
