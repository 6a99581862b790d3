"""``editflow ui``: the MLflow UI on editflow's store."""

from __future__ import annotations

import os
import subprocess
import sys

import click


@click.command("ui", context_settings={"ignore_unknown_options": True})
@click.option("--port", default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def command(port: int, host: str, extra: tuple[str, ...]) -> None:
    """Start ``mlflow ui`` with the same tracking store and artifact root as editflow."""
    from editflow.registry.store import artifact_root, tracking_uri

    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(),
            "--default-artifact-root", artifact_root(), "--host", host, "--port", str(port), *extra]
    click.echo(" ".join(args[2:]))
    raise SystemExit(subprocess.call(args, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}))
