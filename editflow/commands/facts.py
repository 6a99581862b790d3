"""``editflow facts NAME --subject S``: which versions changed a subject."""

from __future__ import annotations

import click


@click.command("facts")
@click.argument("name")
@click.option("--subject", required=True, help="Subject (case-insensitive substring).")
def command(name: str, subject: str) -> None:
    """List every edit of SUBJECT in NAME's versions, oldest first."""
    from editflow.commands.versions import table
    from editflow.registry.ledger import facts_for_subject

    rows = [{"version": f.version, "subject": f.subject, "prompt": f.prompt.format(f.subject),
             "target_new": f.target_new, "target_true": f.target_true or ""} for f in facts_for_subject(name, subject)]
    if not rows:
        click.echo(f"no version of {name} edits a subject matching {subject!r}")
        return
    click.echo(table(rows))
