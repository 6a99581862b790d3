"""``editflow edit``: one edit batch as a tracked MLflow run and a new registered version."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from editflow.commands._options import EXIT_GATE_FAILED, echo_json, json_option, parse_hparams, user_errors
from editflow.job_options import GATE_OPTIONS, job_options

if TYPE_CHECKING:
    from editflow.pipeline import EditJob


@click.command("edit")
@click.argument("requests", type=click.Path(dir_okay=False))
@job_options
@json_option
@user_errors
def command(requests: str, as_json: bool, **options: Any) -> None:
    """Edit the facts in REQUESTS into a model and register the result as a new version.

    Exit status: 0 registered (and promoted when the policy and gate allow), 3 registered but the
    gate failed (not promoted, production unchanged), 1 error (nothing registered).
    """
    from editflow.pipeline import run_edit
    from editflow.registry.store import Registry

    outcome = run_edit(build_job(requests, options), Registry())
    if as_json:
        echo_json(outcome_json(outcome))
    else:
        click.echo(format_outcome(outcome))
    if not outcome.gate.passed and not outcome.promoted:
        raise SystemExit(EXIT_GATE_FAILED)


def build_job(requests: str, options: dict[str, Any]) -> EditJob:
    """The :class:`EditJob` of ``editflow edit REQUESTS`` with these (click-parsed) options: unset
    config options stay out of ``hparams`` so the model's or the config's defaults apply."""
    from editflow.pipeline import EditJob
    from editflow.registry.promotion import GateThresholds
    from editflow.requests import MAX_REQUESTS

    o = options
    overrides = parse_hparams(o["hparams"])
    for key in ("mode", "chunk_size", "algorithm", "layers", "seed"):
        if o[key] not in (None, ""):
            overrides[key] = o[key]
    return EditJob(
        requests=requests,
        model=o["model"],
        registered_model=o["registered_model"] or None,
        hparams=overrides,
        corpus=o["corpus"],
        stats_tokens=o["stats_tokens"] or None,
        stats_cache=o["stats_cache"] or None,
        promote=o["promote"],
        storage=o["storage"],
        device=o["device"] or None,
        dtype=o["dtype"] or None,
        fluency=not o["no_fluency"],
        description=o["description"],
        carry_state=not o["from_zero"],
        max_requests=o["max_requests"] or MAX_REQUESTS,
        thresholds=GateThresholds(**{name: o[name] for name in GATE_OPTIONS}),
    )


def outcome_json(outcome) -> dict:
    """The JSON document of ``edit --json``."""
    return {
        "run_id": outcome.run_id,
        "name": outcome.name,
        "version": outcome.version,
        "parent_version": outcome.parent_version,
        "promoted": outcome.promoted,
        "gate": {
            "passed": outcome.gate.passed,
            "reasons": list(outcome.gate.reasons),
            "warnings": list(outcome.gate.warnings),
        },
        "promotion_error": outcome.promotion_error,
        "metrics": outcome.metrics,
    }


def format_outcome(outcome) -> str:
    from editflow.evaluate import format_summary

    lines = [
        f"run {outcome.run_id}: registered {outcome.name} version {outcome.version} "
        f"(parent {outcome.parent_version}, alias candidate)",
        format_summary(outcome.metrics),
        "gate: " + ("passed" if outcome.gate.passed else "failed (" + "; ".join(outcome.gate.reasons) + ")"),
        *(f"warning: {w}" for w in outcome.gate.warnings),
    ]
    if outcome.promoted:
        lines.append(f"promoted: {outcome.name} version {outcome.version} is now production")
    elif outcome.promotion_error:
        lines.append(f"promotion failed, production unchanged: {outcome.promotion_error}")
    else:
        lines.append(f"not promoted: production unchanged (editflow promote {outcome.name} {outcome.version})")
    return "\n".join(lines)
