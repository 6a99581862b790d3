"""``editflow compare NAME V1 V2``: metric deltas and the facts that differ."""

from __future__ import annotations

from typing import Any

import click

from editflow.commands._options import echo_json, json_option, require_model, user_errors, version_ref
from editflow.commands.facts import fact_json


def compare_json(c: dict[str, Any]) -> dict[str, Any]:
    """:func:`~editflow.registry.report.compare_versions` as plain JSON values."""
    return {
        "name": c["name"],
        "a": c["a"],
        "b": c["b"],
        "metrics": {k: {"a": a, "b": b, "delta": d} for k, (a, b, d) in c["metrics"].items()},
        "only_a": [fact_json(f) for f in c["only_a"]],
        "only_b": [fact_json(f) for f in c["only_b"]],
    }


def _print(c: dict[str, Any]) -> None:
    from editflow.commands.versions import table

    fmt = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    rows = [
        {"metric": k, f"v{c['a']}": fmt(a), f"v{c['b']}": fmt(b), "delta": fmt(d)}
        for k, (a, b, d) in c["metrics"].items()
    ]
    click.echo(table(rows))
    for label, facts in ((f"only in v{c['a']}", c["only_a"]), (f"only in v{c['b']}", c["only_b"])):
        click.echo(f"{label}: {len(facts)} facts")
        for f in facts[:20]:
            click.echo(f"  {f.prompt.format(f.subject)} -> {f.target_new} (v{f.version})")


@click.command("compare")
@click.argument("name")
@click.argument("v1")
@click.argument("v2")
@json_option
@user_errors
def command(name: str, v1: str, v2: str, as_json: bool) -> None:
    """Compare two versions of NAME (deltas are V2 − V1); V1, V2 are numbers or aliases.

    \b
    --json prints {"name": NAME, "a": int (V1), "b": int (V2),
      "metrics": {name: {"a": float|null, "b": float|null, "delta": float|null}},
      "only_a": [fact], "only_b": [fact]}  (facts held by one version and not the other), where
      fact = {"version", "subject", "prompt" (template with {}), "target_new", "target_true"}.
    """
    from editflow.registry.report import compare_versions
    from editflow.registry.store import Registry

    reg = Registry()
    require_model(reg, name)
    c = compare_versions(reg, name, version_ref(v1), version_ref(v2))
    if as_json:
        echo_json(compare_json(c))
    else:
        _print(c)
