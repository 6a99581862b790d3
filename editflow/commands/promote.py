"""``editflow promote NAME VERSION``: make a version production."""

from __future__ import annotations

import click

from editflow.commands._options import fail, version_ref


@click.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--reason", default="", help="Recorded in the audit ledger.")
def command(name: str, version: str, reason: str) -> None:
    """Point the production alias (and stage) of NAME at VERSION."""
    from editflow.registry.promotion import promote

    try:
        moved = promote(name, version_ref(version), reason=reason or "manual promotion")
    except Exception as exc:  # noqa: BLE001 - report any registry error; production is unchanged
        fail(f"{exc} (production unchanged)")
    click.echo(f"{name}: production {moved['previous']} -> {moved['version']}")
