"""``editflow versions NAME``: the version table."""

from __future__ import annotations

from typing import Any

import click

from editflow.commands._options import echo_json, json_option, require_model, user_errors

#: Columns of :func:`editflow.registry.report.version_rows` that are not headline metrics.
_FIXED = ("version", "aliases", "stage", "role", "parent", "facts", "new_facts", "created")


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain aligned text table."""
    if not rows:
        return "(none)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*columns), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in cells]
    )


def _number(text: Any) -> float | int | None:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``""`` -> None."""
    if text in ("", None):
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in str(text) else value


def _metric(text: Any) -> float | str | None:
    """A headline-metric tag as a float (``None`` when empty; kept as is if not a number)."""
    try:
        return None if text in ("", None) else float(text)
    except (TypeError, ValueError):
        return text


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A table row with typed values and the headline metrics under ``metrics``."""
    return {
        "version": int(row["version"]),
        "aliases": [a for a in row["aliases"].split(",") if a],
        "stage": row["stage"],
        "role": row["role"] or None,
        "parent": _number(row["parent"]),
        "facts": int(row["facts"]),
        "new_facts": _number(row["new_facts"]),
        "created": row["created"].replace(" ", "T") + "Z",
        "metrics": {k: _metric(v) for k, v in row.items() if k not in _FIXED},
    }


@click.command("versions")
@click.argument("name")
@json_option
@user_errors
def command(name: str, as_json: bool) -> None:
    """List NAME's versions: aliases/stage, parent, facts held, headline metrics, creation time.

    \b
    --json prints {"name": NAME, "versions": [{"version": int, "aliases": [str], "stage": str,
      "role": "base"|"edit"|null, "parent": int|null, "facts": int (held), "new_facts": int|null,
      "created": "YYYY-MM-DDTHH:MM:SSZ", "metrics": {name: float}}, ...]}, oldest first.
    """
    from editflow.registry.report import version_rows
    from editflow.registry.store import Registry

    reg = Registry()
    require_model(reg, name)
    rows = version_rows(reg, name)
    if as_json:
        echo_json({"name": name, "versions": [json_row(r) for r in rows]})
        return
    click.echo(table(rows))
