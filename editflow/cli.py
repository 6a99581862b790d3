"""The ``editflow`` command line: a click group whose subcommands live in ``editflow.commands``.

Each module in :mod:`editflow.commands` exposes ``command`` (a click command or group); it is
registered under its own name. Modules are imported lazily so ``editflow --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import click

import editflow.commands as _commands


class _LazyGroup(click.Group):
    def _modules(self) -> list[str]:
        return sorted(m.name for m in pkgutil.iter_modules(_commands.__path__) if not m.name.startswith("_"))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [m.replace("_", "-") for m in self._modules()]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = name.replace("-", "_")
        if module not in self._modules():
            return None
        return importlib.import_module(f"editflow.commands.{module}").command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="editflow")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or phase notes on stderr.")
def main(quiet: bool) -> None:
    """editflow: edit facts in causal LMs with MEMIT, tracked and versioned in MLflow."""
    from editflow import progress

    if quiet:
        progress.set_quiet(True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # stdout is the commands' own (--json): not MLflow's "View run at <server URL>" lines
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if progress.is_quiet() or not getattr(sys.stderr, "isatty", lambda: False)():  # MLflow's bars redraw with \r
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    main()
