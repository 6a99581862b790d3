"""``editflow versions NAME``: the version table."""

from __future__ import annotations

import click


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain aligned text table."""
    if not rows:
        return "(none)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*columns), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in cells])


@click.command("versions")
@click.argument("name")
def command(name: str) -> None:
    """List NAME's versions: aliases/stage, parent, facts held, headline metrics, creation time."""
    from editflow.registry.report import version_rows

    rows = version_rows(name)
    if not rows:
        raise click.ClickException(f"no registered model named {name!r}")
    click.echo(table(rows))
