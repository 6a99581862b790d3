"""The edit job's options, defined once: ``editflow edit``'s click options and the ``main`` entry
point of ``projects/memit/MLproject`` both follow from :data:`OPTIONS`, so the two front doors build
the same job from the same (or no) settings.

A default of ``None`` means unset: the model's or the config's own default applies (MLproject: ``""``,
which ``entry.py`` drops). The vocabularies come from their sources: mode and algorithm from
:mod:`editflow.config`'s ``Literal`` types; promote and storage are defined here and checked by
:class:`editflow.pipeline.EditJob`. The gate defaults equal :class:`GateThresholds`' (a test keeps them
so; importing the gate here would load torch on every ``editflow --help``).

``python -m editflow.job_options --write-mlproject`` rewrites the MLproject's ``main`` entry point.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, get_args

import click

from editflow.config import Algorithm, MemitConfig, Mode

F = TypeVar("F", bound=Callable[..., Any])

PROMOTE_CHOICES = ("never", "if-better", "always")
STORAGE_CHOICES = ("delta", "full")
MLPROJECT = Path(__file__).resolve().parents[1] / "projects" / "memit" / "MLproject"
_CONFIG_DEFAULTS = {f.name: f.default for f in fields(MemitConfig)}


@dataclass(frozen=True)
class JobOption:
    """One option: ``--name-with-dashes`` on the command line, ``name`` in MLproject (``mlproject``
    when it is spelled otherwise there, ``""`` when not exposed). A ``bool`` is a flag; ``negate``: the
    MLproject parameter is its opposite (``fluency`` for ``--no-fluency``)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    show_default: bool = False
    mlproject: str | None = None
    negate: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def parameter(self) -> str:
        """The MLproject parameter's name (``""``: not exposed)."""
        return self.name if self.mlproject is None else self.mlproject

    def click_option(self) -> Callable[[F], F]:
        if self.type is bool:
            return click.option(self.flag, is_flag=True, help=self.help)
        kind: Any = click.Choice(list(self.choices)) if self.choices else self.type
        return click.option(self.flag, type=kind, default=self.default, show_default=self.show_default, help=self.help)

    def mlproject_parameter(self) -> dict[str, Any]:
        """``{type, default}`` as MLflow reads it: numbers are ``float`` (MLflow passes "100.0"),
        unset is ``""``, a flag is the string ``"true"``/``"false"``."""
        if self.type is bool:
            return {"type": "string", "default": str(self.default != self.negate).lower()}
        kind = "float" if self.type in (int, float) else "string"
        return {"type": kind, "default": "" if self.default is None else self.default}


_GATE = "Gate: "
OPTIONS: tuple[JobOption, ...] = (
    JobOption(
        "model",
        str,
        "",
        "Base: models:/NAME@ALIAS, models:/NAME/V, a .gguf file, a path or a "
        "hub id. Default: the default model's production version.",
    ),
    JobOption("registered_model", str, "", "Register under this name (default: the base's)."),
    JobOption(
        "mode",
        str,
        None,
        "batch: one MEMIT call over all requests; sequential: chunks applied one after another "
        f"(default: the model's, else {_CONFIG_DEFAULTS['mode']}).",
        choices=get_args(Mode),
    ),
    JobOption(
        "chunk_size",
        int,
        None,
        f"Requests per chunk in sequential mode (default: the model's, else {_CONFIG_DEFAULTS['chunk_size']}).",
    ),
    JobOption(
        "algorithm",
        str,
        None,
        "memit (λC + KKᵀ) or alphaedit (null-space projection; preserves the lineage's earlier edits) "
        f"(default: the model's, else {_CONFIG_DEFAULTS['algorithm']}).",
        choices=get_args(Algorithm),
    ),
    JobOption("layers", str, "", 'Edited layers, e.g. "3,4,5" or "3-8".'),
    JobOption("hparams", str, "", 'Overrides: "v_lr=0.3,mom2_update_weight=5000" or JSON.'),
    JobOption("corpus", str, "bundled", "Statistics corpus (see editflow stats).", show_default=True),
    JobOption("stats_tokens", int, 0, "Statistics token budget (0: the model's default)."),
    JobOption("stats_cache", str, "", "Statistics cache directory (default: EDITFLOW_CACHE)."),
    JobOption(
        "promote",
        str,
        "if-better",
        "never: keep the new version a candidate; if-better: make it production when the gate passes; "
        "always: make it production even when the gate fails.",
        choices=PROMOTE_CHOICES,
        show_default=True,
    ),
    JobOption("min_efficacy", float, 90.0, _GATE + "post efficacy (%).", show_default=True),
    JobOption("max_specificity_drop", float, 10.0, _GATE + "neighbourhood points lost.", show_default=True),
    JobOption("max_ppl_increase", float, 0.10, _GATE + "relative held-out perplexity increase.", show_default=True),
    JobOption(
        "min_retention",
        float,
        90.0,
        _GATE + "efficacy (%) on the facts earlier versions of the lineage hold.",
        show_default=True,
    ),
    JobOption(
        "max_ppl_increase_root",
        float,
        0.10,
        _GATE + "relative held-out perplexity increase over the lineage's root base.",
        show_default=True,
    ),
    JobOption(
        "max_specificity_drop_root",
        float,
        10.0,
        _GATE + "held-out known-fact points lost against the lineage's root base.",
        show_default=True,
    ),
    JobOption(
        "storage",
        str,
        "delta",
        "delta: store only the edited tensors over the root base; full: every weight.",
        choices=STORAGE_CHOICES,
        show_default=True,
    ),
    JobOption("device", str, "", "cpu, cuda, cuda:1 (default: CUDA when available)."),
    JobOption(
        "dtype", str, "", "Load the model in float32/float16/bfloat16 (a GGUF is dequantised to it; default float32)."
    ),
    JobOption(
        "seed",
        int,
        None,
        f"Seed of context templates and sampling (default: the model's, else {_CONFIG_DEFAULTS['seed']}).",
    ),
    JobOption("no_fluency", bool, False, "Skip the fluency metric (faster).", mlproject="fluency", negate=True),
    JobOption(
        "from_zero",
        bool,
        False,
        "Ignore the lineage's edit state: preserve no earlier edits' "
        "keys (the behaviour before edit states; for comparisons).",
    ),
    JobOption("max_requests", int, None, "Refuse files with more requests (default 10,000)."),
    JobOption("description", str, "", "Model version description."),
)
#: The gate's options, named and ordered as :class:`GateThresholds`' fields.
GATE_OPTIONS = (
    "min_efficacy",
    "max_specificity_drop",
    "max_ppl_increase",
    "min_retention",
    "max_ppl_increase_root",
    "max_specificity_drop_root",
)
BY_NAME = {o.name: o for o in OPTIONS}


def job_options(func: F) -> F:
    """Decorate a click command with every option of :data:`OPTIONS` (in order)."""
    return functools.reduce(lambda acc, option: option.click_option()(acc), reversed(OPTIONS), func)


def mlproject_entry_point() -> dict[str, Any]:
    """The ``main`` entry point: ``requests`` (a path) then every exposed option, and its command."""
    exposed = [o for o in OPTIONS if o.parameter]
    parameters: dict[str, Any] = {"requests": "path"}
    parameters.update({o.parameter: o.mlproject_parameter() for o in exposed})
    words = ["python entry.py edit {requests}"]
    words += [f"--{o.parameter.replace('_', '-')} {{{o.parameter}}}" for o in exposed]
    return {"parameters": parameters, "command": " ".join(words)}


def _yaml_value(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def render_main(indent: str = "  ") -> str:
    """The ``main:`` block of the MLproject, in its hand-written style (flow maps, folded command)."""
    entry = mlproject_entry_point()
    lines = [f"{indent}main:", f"{indent * 2}parameters:"]
    for name, spec in entry["parameters"].items():
        if isinstance(spec, str):
            lines.append(f"{indent * 3}{name}: {spec}")
        else:
            lines.append(f"{indent * 3}{name}: {{type: {spec['type']}, default: {_yaml_value(spec['default'])}}}")
    lines.append(f"{indent * 2}command: >-")
    line = ""
    for word in re.findall(r"--\S+ \{\w+\}|python entry\.py edit \{requests\}", entry["command"]):
        if line and len(line) + 1 + len(word) > 96:
            lines.append(f"{indent * 3}{line}")
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(f"{indent * 3}{line}")
    return "\n".join(lines) + "\n"


def write_mlproject(path: Path = MLPROJECT) -> bool:
    """Replace the ``main`` entry point of ``path`` with :func:`render_main`; ``True`` if it changed."""
    text = path.read_text()
    new = re.sub(r"(?ms)^  main:\n.*?\n(?=\n|\Z)", lambda _: render_main(), text, count=1)
    if new == text:
        return False
    path.write_text(new)
    return True


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-mlproject"]:
        sys.exit("usage: python -m editflow.job_options --write-mlproject")
    print(f"{MLPROJECT}: " + ("rewritten" if write_mlproject() else "up to date"))
