"""``editflow ledger migrate SOURCE``: bring an existing ledger into the one this store uses."""

from __future__ import annotations

import click

from editflow.commands._options import echo_json, json_option, user_errors


@click.group("ledger")
def command() -> None:
    """The audit ledger (facts per version, promotion history)."""


@command.command("migrate")
@click.argument("source")
@click.option("--model", "model_name", default="", help="Copy only this registered model's rows (default: all).")
@json_option
@user_errors
def migrate_command(source: str, model_name: str, as_json: bool) -> None:
    """Copy the facts and events of the ledger at SOURCE (a SQLAlchemy URI or a path to an
    ``editflow-ledger.db``) into this store's ledger (EDITFLOW_LEDGER_URI, or the tracking database).
    Rows already there are skipped, so it can be run again; a failure copies nothing.

    \b
    --json prints {"source": str, "facts": int, "events": int, "skipped": int}.
    """
    from pathlib import Path

    from editflow.registry.ledger import migrate
    from editflow.registry.store import Registry, mask_uri

    uri = source if "://" in source else f"sqlite:///{Path(source).resolve()}"
    path = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(path).is_file():
        raise FileNotFoundError(2, "no ledger file", path)
    report = migrate(uri, Registry(), model_name or None)
    if as_json:
        echo_json({"source": mask_uri(uri), "facts": report.facts, "events": report.events, "skipped": report.skipped})
        return
    click.echo(
        f"copied {report.facts} facts and {report.events} events from {mask_uri(uri)} ({report.skipped} already there)"
    )
