"""``editflow edit``: one edit batch as a tracked MLflow run and a new registered version."""

from __future__ import annotations

import click

from editflow.commands._options import EXIT_GATE_FAILED, echo_json, json_option, parse_hparams, user_errors


@click.command("edit")
@click.argument("requests", type=click.Path(dir_okay=False))
@click.option(
    "--model",
    default="",
    help="Base: models:/NAME@ALIAS, models:/NAME/V, a .gguf file, a path or a "
    "hub id. Default: the default model's production version.",
)
@click.option("--registered-model", default="", help="Register under this name (default: the base's).")
@click.option(
    "--mode",
    type=click.Choice(["batch", "sequential"]),
    default=None,
    help="batch: one MEMIT call over all requests; sequential: chunks applied one after another.",
)
@click.option("--chunk-size", type=int, default=None, help="Requests per chunk in sequential mode.")
@click.option(
    "--algorithm",
    type=click.Choice(["memit", "alphaedit"]),
    default=None,
    help="memit (λC + KKᵀ) or alphaedit (null-space projection; preserves the lineage's earlier edits).",
)
@click.option("--layers", default="", help='Edited layers, e.g. "3,4,5" or "3-8".')
@click.option("--hparams", default="", help='Overrides: "v_lr=0.3,mom2_update_weight=5000" or JSON.')
@click.option("--corpus", default="bundled", show_default=True, help="Statistics corpus (see editflow stats).")
@click.option("--stats-tokens", type=int, default=0, help="Statistics token budget (0: the model's default).")
@click.option("--stats-cache", default="", help="Statistics cache directory (default: EDITFLOW_CACHE).")
@click.option("--promote", type=click.Choice(["never", "if-better", "always"]), default="if-better", show_default=True)
@click.option("--min-efficacy", type=float, default=90.0, show_default=True, help="Gate: post efficacy (%).")
@click.option(
    "--max-specificity-drop", type=float, default=10.0, show_default=True, help="Gate: neighbourhood points lost."
)
@click.option(
    "--max-ppl-increase",
    type=float,
    default=0.10,
    show_default=True,
    help="Gate: relative held-out perplexity increase.",
)
@click.option(
    "--min-retention",
    type=float,
    default=90.0,
    show_default=True,
    help="Gate: efficacy (%) on the facts earlier versions of the lineage hold.",
)
@click.option(
    "--max-ppl-increase-root",
    type=float,
    default=0.10,
    show_default=True,
    help="Gate: relative held-out perplexity increase over the lineage's root base.",
)
@click.option(
    "--max-specificity-drop-root",
    type=float,
    default=10.0,
    show_default=True,
    help="Gate: held-out known-fact points lost against the lineage's root base.",
)
@click.option(
    "--storage",
    type=click.Choice(["delta", "full"]),
    default="delta",
    show_default=True,
    help="delta: store only the edited tensors over the root base; full: every weight.",
)
@click.option("--device", default="", help="cpu, cuda, cuda:1 (default: CUDA when available).")
@click.option(
    "--dtype",
    default="",
    help="Load the model in float32/float16/bfloat16 (a GGUF is dequantised to it; default float32).",
)
@click.option("--seed", type=int, default=None, help="Seed of context templates and sampling (default 0).")
@click.option("--no-fluency", is_flag=True, help="Skip the fluency metric (faster).")
@click.option(
    "--from-zero",
    is_flag=True,
    help="Ignore the lineage's edit state: preserve no earlier edits' "
    "keys (the behaviour before edit states; for comparisons).",
)
@click.option("--max-requests", type=int, default=None, help="Refuse files with more requests (default 10,000).")
@click.option("--description", default="", help="Model version description.")
@json_option
@user_errors
def command(
    requests: str,
    model: str,
    registered_model: str,
    mode: str | None,
    chunk_size: int | None,
    algorithm: str | None,
    layers: str,
    hparams: str,
    corpus: str,
    stats_tokens: int,
    stats_cache: str,
    promote: str,
    min_efficacy: float,
    max_specificity_drop: float,
    max_ppl_increase: float,
    min_retention: float,
    max_ppl_increase_root: float,
    max_specificity_drop_root: float,
    storage: str,
    device: str,
    dtype: str,
    seed: int | None,
    no_fluency: bool,
    from_zero: bool,
    max_requests: int | None,
    description: str,
    as_json: bool,
) -> None:
    """Edit the facts in REQUESTS into a model and register the result as a new version.

    Exit status: 0 registered (and promoted when the policy and gate allow), 3 registered but the
    gate failed (not promoted, production unchanged), 1 error (nothing registered).
    """
    from editflow.pipeline import EditJob, run_edit
    from editflow.registry.promotion import GateThresholds
    from editflow.registry.store import Registry
    from editflow.requests import MAX_REQUESTS

    overrides = parse_hparams(hparams)
    for key, value in (
        ("mode", mode),
        ("chunk_size", chunk_size),
        ("algorithm", algorithm),
        ("layers", layers or None),
        ("seed", seed),
    ):
        if value is not None:
            overrides[key] = value
    job = EditJob(
        requests=requests,
        model=model,
        registered_model=registered_model or None,
        hparams=overrides,
        corpus=corpus,
        stats_tokens=stats_tokens or None,
        stats_cache=stats_cache or None,
        promote=promote,
        storage=storage,
        device=device or None,
        dtype=dtype or None,
        fluency=not no_fluency,
        description=description,
        carry_state=not from_zero,
        max_requests=max_requests or MAX_REQUESTS,
        thresholds=GateThresholds(
            min_efficacy,
            max_specificity_drop,
            max_ppl_increase,
            min_retention,
            max_ppl_increase_root,
            max_specificity_drop_root,
        ),
    )
    outcome = run_edit(job, Registry())
    if as_json:
        echo_json(outcome_json(outcome))
    else:
        click.echo(format_outcome(outcome))
    if not outcome.gate.passed and not outcome.promoted:
        raise SystemExit(EXIT_GATE_FAILED)


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
