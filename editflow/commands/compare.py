"""``editflow compare NAME V1 V2``: metric deltas and the facts that differ."""

from __future__ import annotations

import click

from editflow.commands._options import fail, version_ref


@click.command("compare")
@click.argument("name")
@click.argument("v1")
@click.argument("v2")
def command(name: str, v1: str, v2: str) -> None:
    """Compare two versions of NAME (deltas are V2 − V1)."""
    from editflow.commands.versions import table
    from editflow.registry.report import compare_versions

    try:
        c = compare_versions(name, version_ref(v1), version_ref(v2))
    except Exception as exc:  # noqa: BLE001
        fail(str(exc))
    fmt = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    rows = [{"metric": k, f"v{c['a']}": fmt(a), f"v{c['b']}": fmt(b), "delta": fmt(d)} for k, (a, b, d) in c["metrics"].items()]
    click.echo(table(rows))
    for label, facts in ((f"only in v{c['a']}", c["only_a"]), (f"only in v{c['b']}", c["only_b"])):
        click.echo(f"{label}: {len(facts)} facts")
        for f in facts[:20]:
            click.echo(f"  {f.prompt.format(f.subject)} -> {f.target_new} (v{f.version})")
