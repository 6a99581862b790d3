"""``editflow demo``: rebuild the bundled default model from CounterFact-format records."""

from __future__ import annotations

import json

import click


@click.group("demo")
def command() -> None:
    """The bundled default fact model."""


@click.command("build")
@click.option("--records", "records", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="CounterFact-format JSON file (repeatable; deduplicated by case_id).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--epochs", default=11.0, show_default=True)
@click.option("--max-minutes", default=45.0, show_default=True)
@click.option("--n-layer", default=6, show_default=True)
@click.option("--n-embd", default=256, show_default=True)
@click.option("--n-inner", default=1024, show_default=True)
@click.option("--n-head", default=8, show_default=True)
@click.option("--n-positions", default=64, show_default=True)
@click.option("--vocab-size", default=2048, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--filler-ratio", default=0.15, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--threads", default=1, show_default=True)
def build(records: tuple[str, ...], out_dir: str, **options) -> None:
    """Train tokenizer and model on --records and save them (with card.json) to --out."""
    from editflow.demo import build_default_model

    card = build_default_model(list(records), out_dir, **options)
    click.echo(json.dumps({k: card[k] for k in ("n_params", "train_minutes", "steps", "pre_edit")}, indent=2))


command.add_command(build)
