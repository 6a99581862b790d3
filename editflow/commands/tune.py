"""``editflow tune``: per-model edit defaults chosen by measurement, stored with the registered base."""

from __future__ import annotations

import click

from editflow.commands._options import user_errors


@click.command("tune")
@click.argument("model")
@click.option(
    "--records",
    "records_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Request file (plain, CounterFact or zsRE), split into tuning and validation records.",
)
@click.option(
    "--budget-minutes",
    type=float,
    default=30.0,
    show_default=True,
    help="Time box: no new trial starts after it (the first trial and the validation always run).",
)
@click.option("--trials", type=int, default=12, show_default=True, help="Configurations to try at most.")
@click.option(
    "--n-edits", type=int, default=10, show_default=True, help="Requests edited per trial (and in the validation edit)."
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the split and the trace noise (the search is deterministic).",
)
@click.option(
    "--registered-model",
    default="",
    help="Store the result with this registered model (default: the base's own, else editflow-<model folder>).",
)
@click.option("--corpus", default="bundled", show_default=True, help="Statistics corpus (see editflow stats).")
@click.option("--stats-tokens", type=int, default=0, help="Statistics token budget (0: the model's default).")
@click.option("--stats-cache", default="", help="Statistics cache directory (default: EDITFLOW_CACHE).")
@click.option("--trace-samples", type=int, default=5, show_default=True, help="Noise samples per traced prompt.")
@click.option("--device", default="", help="cpu, cuda, ... (default: cuda when available).")
@click.option(
    "--from-published",
    is_flag=True,
    help="Search from the architecture's published defaults, not the model's current ones (shipped or tuned).",
)
@user_errors(note="nothing registered")
def command(
    model: str,
    records_path: str,
    budget_minutes: float,
    trials: int,
    n_edits: int,
    seed: int,
    registered_model: str,
    corpus: str,
    stats_tokens: int,
    stats_cache: str,
    trace_samples: int,
    device: str,
    from_published: bool,
) -> None:
    """Choose MEMIT defaults for MODEL (models:/NAME@ALIAS, models:/NAME/V, a path, a hub id or "default")
    by causal tracing and a coordinate search on --records, validate them on held-back records and store them
    on the registered base version (tag editflow.tuned)."""
    from editflow.registry.store import Registry
    from editflow.tune import TuneJob, run_tune

    job = TuneJob(
        model=model,
        records=records_path,
        budget_minutes=budget_minutes,
        trials=trials,
        n_edits=n_edits,
        seed=seed,
        registered_model=registered_model or None,
        corpus=corpus,
        stats_tokens=stats_tokens or None,
        stats_cache=stats_cache or None,
        trace_samples=trace_samples,
        device=device or None,
        from_published=from_published,
    )
    click.echo(format_outcome(run_tune(job, Registry())))


def format_outcome(outcome) -> str:
    """What a user reads after a tune: the window, the search, the chosen values and validation figures."""
    hp = outcome.hparams
    val = outcome.validation
    figures = ", ".join(
        f"{k} {val[k]:.1f}"
        for k in ("efficacy", "paraphrase", "neighborhood", "neighborhood_auto", "zsre_efficacy", "score", "objective")
        if k in val
    )
    return "\n".join(
        [
            f"run {outcome.run_id}: traced window {list(outcome.layers_traced)}",
            outcome.search.message,
            "chosen: " + ", ".join(f"{k}={v}" for k, v in hp.items()),
            f"validation ({len(outcome.report['split']['validation'])} requests): {figures}",
            f"stored on {outcome.name} version {outcome.version} (tag editflow.tuned)",
        ]
    )
