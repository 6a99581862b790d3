"""``editflow rollback NAME [--to VERSION]``: return production to an earlier version."""

from __future__ import annotations

import click

from editflow.commands._options import echo_json, json_option, require_model, user_errors, version_ref


@click.command("rollback")
@click.argument("name")
@click.option(
    "--to",
    "to",
    default=None,
    help="Version number or alias to return to (default: the previous production, from the ledger).",
)
@click.option("--reason", default="", help="Recorded in the audit ledger.")
@json_option
@user_errors(note="production unchanged")
def command(name: str, to: str | None, reason: str, as_json: bool) -> None:
    """Move NAME's production alias back (the weights loaded are bit-identical to that version's).

    \b
    --json prints {"name": NAME, "version": int (now production),
      "previous": int|null (production before), "action": "rollback"}.
    """
    from editflow.registry import integrity
    from editflow.registry.promotion import rollback
    from editflow.registry.store import Registry

    reg = Registry()
    require_model(reg, name)
    integrity.repair(reg, name)  # finish what a killed process left (promotion intents, pending versions)
    moved = rollback(reg, name, version_ref(to) if to else None, reason=reason)
    if as_json:
        echo_json(moved)
    else:
        click.echo(f"{name}: production {moved['previous']} -> {moved['version']} (rollback)")
