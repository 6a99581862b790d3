"""``editflow facts NAME --subject S``: which versions changed a subject."""

from __future__ import annotations

from typing import Any

import click

from editflow.commands._options import echo_json, json_option, require_model, user_errors


def fact_json(fact: Any) -> dict[str, Any]:
    """One ledger fact, the same keys as ``editflow show --json``'s facts."""
    return {
        "version": fact.version,
        "subject": fact.subject,
        "prompt": fact.prompt,
        "target_new": fact.target_new,
        "target_true": fact.target_true,
    }


@click.command("facts")
@click.argument("name")
@click.option("--subject", required=True, help="Subject (case-insensitive substring).")
@json_option
@user_errors
def command(name: str, subject: str, as_json: bool) -> None:
    """List every edit of SUBJECT in NAME's versions, oldest first (exit 1 if NAME is not registered).

    \b
    --json prints {"name": NAME, "subject": SUBJECT, "facts": [{"version": int, "subject": str,
      "prompt": str (template with {}), "target_new": str, "target_true": str|null}, ...]}.
    """
    from editflow.commands.versions import table
    from editflow.registry.ledger import facts_for_subject
    from editflow.registry.store import Registry

    reg = Registry()
    require_model(reg, name)
    facts = facts_for_subject(reg, name, subject)
    if as_json:
        echo_json({"name": name, "subject": subject, "facts": [fact_json(f) for f in facts]})
        return
    if not facts:
        click.echo(f"no version of {name} edits a subject matching {subject!r}")
        return
    click.echo(
        table(
            [
                {
                    "version": f.version,
                    "subject": f.subject,
                    "prompt": f.prompt.format(f.subject),
                    "target_new": f.target_new,
                    "target_true": f.target_true or "",
                }
                for f in facts
            ]
        )
    )
