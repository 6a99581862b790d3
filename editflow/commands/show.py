"""``editflow show NAME VERSION``: one version in detail."""

from __future__ import annotations

from typing import Any

import click

from editflow.commands._options import echo_json, json_option, require_model, user_errors, version_ref
from editflow.registry.schema import TUNED_TAG


def _print(info: dict[str, Any]) -> None:
    click.echo(
        f"{info['name']} version {info['version']}  aliases: {', '.join(info['aliases']) or '-'}  "
        f"stage: {info['stage']}  run: {info['run_id']}"
    )
    click.echo(info["description"] or "")
    for k, v in sorted(info["tags"].items()):
        if k != TUNED_TAG:
            click.echo(f"  {k} = {v}")
    tuned = info.get("tuned")
    if tuned:
        hp = ", ".join(f"{k}={v}" for k, v in sorted(tuned["hparams"].items()))
        val = ", ".join(f"{k} {v:.1f}" for k, v in sorted(tuned["validation"].items()) if isinstance(v, (int, float)))
        click.echo(f"tuned edit defaults (editflow tune, run {tuned['run_id']}): {hp}")
        click.echo(f"  validation: {val}")
    for k in sorted(m for m in info["metrics"] if m.startswith(("pre/", "post/"))):
        click.echo(f"  {k:<32} {info['metrics'][k]:.3f}")
    click.echo(f"facts edited in this version: {len(info['facts'])}")
    for f in info["facts"][:20]:
        click.echo(f"  {f['prompt'].format(f['subject'])} -> {f['target_new']}")
    for e in info["events"]:
        click.echo(f"  {e['time']} {e['action']} by {e['actor']}: {e['reason']}")


@click.command("show")
@click.argument("name")
@click.argument("version")
@json_option
@user_errors
def command(name: str, version: str, as_json: bool) -> None:
    """Tags, lineage, metrics, facts and ledger events of one VERSION (a number or an alias) of NAME.

    \b
    --json prints {"name": str, "version": int, "description": str, "stage": str,
      "aliases": [str], "tags": {str: str}, "run_id": str|null, "metrics": {str: float} (the edit
      run's; empty for a base), "facts": [{"version", "subject", "prompt", "target_new",
      "target_true"}] (edited in this version), "events": [{"action", "time" (ISO 8601), "actor",
      "previous", "reason"}], "tuned": {"hparams", "validation", "run_id", ...}|null (the edit
      defaults editflow tune stored on the root base)}.
    """
    from editflow.registry.report import show_version
    from editflow.registry.store import Registry

    reg = Registry()
    require_model(reg, name)
    info = show_version(reg, name, version_ref(version))
    if as_json:
        echo_json(info)
    else:
        _print(info)
