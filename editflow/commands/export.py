"""``editflow export NAME VERSION DIR``: a standalone save_pretrained directory of any version."""

from __future__ import annotations

import click

from editflow.commands._options import fail, version_ref


@click.command("export")
@click.argument("name")
@click.argument("version")
@click.argument("out_dir", type=click.Path(file_okay=False))
def command(name: str, version: str, out_dir: str) -> None:
    """Write VERSION of NAME (full weights + tokenizer) to OUT_DIR, loadable with plain transformers."""
    from editflow.registry.versions import export_version

    try:
        path = export_version(name, version_ref(version), out_dir)
    except Exception as exc:  # noqa: BLE001
        fail(str(exc))
    click.echo(f"exported {name} version {version} to {path}")
