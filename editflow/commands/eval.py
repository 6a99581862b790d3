"""``editflow eval``: evaluate any causal LM on any request file (no editing)."""

from __future__ import annotations

import click

from editflow.commands._options import check_tracking_server, user_errors


def resolve_model(uri: str, device: str | None = None, dtype: str | None = None) -> object:
    """Load ``uri``: ``default``, ``models:/NAME@ALIAS``, ``models:/NAME/V``, a local path or a hub id
    (a path that starts with ``.``, ``/`` or ``~`` must exist)."""
    import errno
    from pathlib import Path

    from editflow.registry.resolve import load_any
    from editflow.registry.store import Registry

    if uri.startswith((".", "/", "~")) and not Path(uri).expanduser().exists():
        raise FileNotFoundError(errno.ENOENT, "no such model directory", uri)
    if uri in ("", "default") or uri.startswith("models:/"):
        check_tracking_server()
    return load_any(Registry(), uri, device=device, dtype=dtype)


@click.command("eval")
@click.argument("model")
@click.argument("requests_path", metavar="REQUESTS", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    default="eval_out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for the fact table and summary.",
)
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
@click.option("--dtype", default=None, help="float32, float16 or bfloat16 (default: as saved).")
@click.option("--batch-size", default=64, show_default=True, help="Rows per forward (micro-batch).")
@click.option("--no-fluency", is_flag=True, help="Skip the generation-entropy metric.")
@click.option(
    "--fluency-max",
    default=None,
    type=click.IntRange(min=0),
    help="Sample fluency on at most this many facts (seeded; 0: every fact; default: 50).",
)
@click.option(
    "--heldout",
    "heldout_path",
    default=None,
    type=click.Path(dir_okay=False),
    help=(
        "Held-out text, one document per line, for drift (default: bundled corpus/heldout.txt); lines "
        "that mention an evaluated subject or a bundled record's subject are left out."
    ),
)
@click.option(
    "--heldout-facts",
    "heldout_facts_n",
    default=100,
    show_default=True,
    help="Bundled CounterFact facts not being edited used for held-out specificity (0: none).",
)
@click.option("--limit", default=None, type=int, help="Evaluate only the first N requests.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fluency sampling.")
@user_errors(probe=False)
def command(
    model: str,
    requests_path: str,
    out_dir: str,
    device: str | None,
    dtype: str | None,
    batch_size: int,
    no_fluency: bool,
    fluency_max: int | None,
    heldout_path: str | None,
    heldout_facts_n: int,
    limit: int | None,
    seed: int,
) -> None:
    """Evaluate MODEL (HF id, local path or registered URI) on the REQUESTS file, unedited."""
    from editflow.evaluate import (
        Evaluator,
        default_heldout_facts,
        drift_texts,
        fact_table,
        format_summary,
        summary,
        write_report,
    )
    from editflow.requests import load_requests

    requests = load_requests(requests_path)[:limit]
    handle = resolve_model(model, device=device, dtype=dtype)
    ev = Evaluator(
        handle,
        requests,
        heldout_texts=drift_texts(requests, heldout_path),
        heldout_facts=default_heldout_facts(requests, heldout_facts_n) if heldout_facts_n else (),
        fluency=not no_fluency,
        **({} if fluency_max is None else {"fluency_max": fluency_max}),
        seed=seed,
        batch_rows=batch_size,
    )
    pre = ev.pre()
    paths = write_report(out_dir, fact_table(requests, pre), summary(pre))
    click.echo(format_summary(summary(pre)))
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
