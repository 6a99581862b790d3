"""``editflow trace``: causal tracing of CounterFact facts in a model."""

from __future__ import annotations

import json
from pathlib import Path

import click


def load(model_id: str):
    """(model, tokenizer) via :func:`editflow.models.load_model` when available, else plain transformers."""
    try:
        from editflow.models import load_model
    except ImportError:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return AutoModelForCausalLM.from_pretrained(model_id).eval(), AutoTokenizer.from_pretrained(model_id)
    handle = load_model(model_id)
    return handle.model, handle.tokenizer


@click.command("trace")
@click.argument("model")
@click.option("--records", "records_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CounterFact-format JSON file.")
@click.option("--n", default=50, show_default=True, help="Number of records traced (first N).")
@click.option("--out", "out_dir", default="trace_out", show_default=True, type=click.Path(file_okay=False))
@click.option("--noise", default=3.0, show_default=True, help="Noise std as a multiple of the embedding std.")
@click.option("--samples", default=10, show_default=True, help="Noise samples per prompt.")
@click.option("--window", default=1, show_default=True, help="Number of MLP layers restored together.")
@click.option("--seed", default=0, show_default=True)
def command(model: str, records_path: str, n: int, out_dir: str, noise: float, samples: int,
            window: int, seed: int) -> None:
    """Causal trace of MODEL (HF id or local path) on the rewrite prompts of --records."""
    import torch

    from editflow.trace import format_table, save_summary, trace_records

    torch.manual_seed(seed)
    records = json.loads(Path(records_path).read_text())[:n]
    lm, tok = load(model)
    _, summary = trace_records(lm, tok, records, noise=noise, samples=samples, window=window, seed=seed)
    out = save_summary(summary, out_dir)
    click.echo(format_table(summary))
    click.echo(f"best 3 consecutive MLP layers: {summary.best_mlp_layers(3)}")
    click.echo(f"wrote {out / 'trace.json'} and {out / 'trace.png'}")
