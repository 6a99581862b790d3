"""``editflow ui``: the MLflow UI on editflow's store (or the address of the tracking server that has it)."""

from __future__ import annotations

import os
import subprocess
import sys

import click

from editflow.commands._options import mask_uri


def is_local_store(uri: str) -> bool:
    """A database or file store ``mlflow ui`` can open (not a tracking server such as ``http(s)://``)."""
    from urllib.parse import urlparse

    from editflow.registry.store import is_sql

    if uri.lower().startswith("databricks"):
        return False
    scheme = urlparse(uri).scheme.lower()
    return is_sql(uri) or scheme in ("", "file") or len(scheme) == 1  # len 1: a Windows drive letter


def ui_command(host: str, port: int, extra: tuple[str, ...]) -> list[str]:
    """``mlflow ui`` argv; the store URI travels in the environment, so no credential is in argv."""
    return [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port), *extra]


def ui_env(uri: str, artifact_root: str) -> dict[str, str]:
    """The environment of ``mlflow ui``: store, artifact root, no telemetry."""
    return {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": uri,
        "MLFLOW_DEFAULT_ARTIFACT_ROOT": artifact_root,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


@click.command("ui", context_settings={"ignore_unknown_options": True})
@click.option("--port", default=5000, show_default=True, help="Port of the local UI.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface the local UI listens on.")
@click.option("--dry-run", is_flag=True, help="Print what would run (credentials masked) and exit.")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def command(port: int, host: str, dry_run: bool, extra: tuple[str, ...]) -> None:
    """Start 'mlflow ui' on editflow's tracking store and artifact root (EXTRA: more 'mlflow ui'
    arguments, e.g. --workers 1). With an http(s):// tracking URI the server already is the UI: its
    address is printed and nothing is started. Passwords in URIs are printed as ****."""
    from editflow.registry.store import artifact_root, default_tracking_uri

    uri = default_tracking_uri()
    if not is_local_store(uri):
        click.echo(f"the tracking server {mask_uri(uri)} serves the MLflow UI: open it in a browser")
        return
    args = ui_command(host, port, extra)
    click.echo(
        " ".join(
            [
                "mlflow",
                *args[3:],
                "--backend-store-uri",
                mask_uri(uri),
                "--default-artifact-root",
                mask_uri(artifact_root()),
            ]
        )
    )
    if dry_run:
        return
    run(args, ui_env(uri, artifact_root()))


def run(args: list[str], env: dict[str, str]) -> None:
    """Become ``mlflow ui`` (POSIX: exec, so signals reach it and no process is left behind), else
    run it and exit with its status."""
    sys.stdout.flush()
    if os.name == "posix":
        os.execve(args[0], args, env)
    raise SystemExit(subprocess.call(args, env=env))
