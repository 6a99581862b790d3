"""``editflow rollback NAME [--to VERSION]``: return production to an earlier version."""

from __future__ import annotations

import click

from editflow.commands._options import fail, version_ref


@click.command("rollback")
@click.argument("name")
@click.option("--to", "to", default=None, help="Version to return to (default: the previous production).")
@click.option("--reason", default="", help="Recorded in the audit ledger.")
def command(name: str, to: str | None, reason: str) -> None:
    """Move NAME's production alias back (the weights loaded are bit-identical to that version's)."""
    from editflow.registry.promotion import rollback

    try:
        moved = rollback(name, version_ref(to) if to else None, reason=reason)
    except Exception as exc:  # noqa: BLE001
        fail(f"{exc} (production unchanged)")
    click.echo(f"{name}: production {moved['previous']} -> {moved['version']} (rollback)")
