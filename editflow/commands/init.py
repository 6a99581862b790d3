"""``editflow init``: register the bundled default model (version 1, alias production)."""

from __future__ import annotations

import click

from editflow.commands._options import mask_uri, user_errors


@click.command("init")
@user_errors
def command() -> None:
    """Register the bundled default model in the tracking store if it is not there yet."""
    from editflow.registry.resolve import ensure_default_model
    from editflow.registry.store import DEFAULT_MODEL_NAME, Registry

    reg = Registry()
    version = ensure_default_model(reg)
    click.echo(
        f"{DEFAULT_MODEL_NAME} version {version} is registered in {mask_uri(reg.tracking_uri)} "
        f"(alias production: models:/{DEFAULT_MODEL_NAME}@production)"
    )
