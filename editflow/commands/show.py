"""``editflow show NAME VERSION``: one version in detail."""

from __future__ import annotations

import json

import click

from editflow.commands._options import fail, version_ref


@click.command("show")
@click.argument("name")
@click.argument("version")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(name: str, version: str, as_json: bool) -> None:
    """Tags, lineage, metrics, facts and ledger events of one version."""
    from editflow.registry.report import show_version

    try:
        info = show_version(name, version_ref(version))
    except Exception as exc:  # noqa: BLE001
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"{info['name']} version {info['version']}  aliases: {', '.join(info['aliases']) or '-'}  "
               f"stage: {info['stage']}  run: {info['run_id']}")
    click.echo(info["description"] or "")
    for k, v in sorted(info["tags"].items()):
        click.echo(f"  {k} = {v}")
    for k in sorted(m for m in info["metrics"] if m.startswith(("pre/", "post/"))):
        click.echo(f"  {k:<32} {info['metrics'][k]:.3f}")
    click.echo(f"facts edited in this version: {len(info['facts'])}")
    for f in info["facts"][:20]:
        click.echo(f"  {f['prompt'].format(f['subject'])} -> {f['target_new']}")
    for e in info["events"]:
        click.echo(f"  {e['time']} {e['action']} by {e['actor']}: {e['reason']}")
