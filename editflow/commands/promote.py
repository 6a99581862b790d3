"""``editflow promote NAME VERSION``: make a version production."""

from __future__ import annotations

import click

from editflow.commands._options import echo_json, json_option, require_model, user_errors, version_ref


@click.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--reason", default="", help="Recorded in the audit ledger.")
@json_option
@user_errors(note="production unchanged")
def command(name: str, version: str, reason: str, as_json: bool) -> None:
    """Point the production alias (and stage) of NAME at VERSION (a number or an alias).

    \b
    --json prints {"name": NAME, "version": int (now production),
      "previous": int|null (production before), "action": "promote"}.
    """
    from editflow.registry import integrity
    from editflow.registry.promotion import promote
    from editflow.registry.store import Registry

    reg = Registry()
    require_model(reg, name)
    integrity.repair(reg, name)  # finish what a killed process left (promotion intents, pending versions)
    moved = promote(reg, name, version_ref(version), reason=reason or "manual promotion")
    if as_json:
        echo_json(moved)
    else:
        click.echo(f"{name}: production {moved['previous']} -> {moved['version']}")
