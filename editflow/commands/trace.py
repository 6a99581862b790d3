"""``editflow trace``: causal tracing of a model's facts (any request format), with its table, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from editflow.commands._options import fail, user_errors
from editflow.trace import TraceSummary


def format_table(summary: TraceSummary) -> str:
    """Per-layer table: MLP effect and block-output effect at the last subject token and last token."""
    hid = np.asarray(summary.hidden_effect)
    lines = [
        f"clean P(true)={summary.p_clean:.3f}  corrupted={summary.p_corrupt:.3f}  n={summary.n}",
        "layer  mlp@last_subj  hidden@last_subj  hidden@last_token",
    ]
    for layer, m in enumerate(summary.mlp_effect):
        lines.append(f"{layer:5d}  {m:13.4f}  {hid[layer, 2]:16.4f}  {hid[layer, 5]:17.4f}")
    return "\n".join(lines)


def plot_summary(summary: TraceSummary, path: str | Path) -> None:
    """Heat map of block-output indirect effects (positions × layers) and the MLP effect per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hid = np.asarray(summary.hidden_effect).T
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    im = a.imshow(hid, cmap="Purples", aspect="auto", vmin=0)
    a.set_yticks(range(len(summary.buckets)), summary.buckets)
    a.set_xlabel("layer")
    a.set_title(f"restored block output (n={summary.n})")
    fig.colorbar(im, ax=a, label="P(true) − P(corrupted)")
    b.bar(range(len(summary.mlp_effect)), summary.mlp_effect, color="tab:green")
    b.set_xlabel("layer")
    b.set_title(f"MLP at last subject token (window {summary.window})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_summary(summary: TraceSummary, out_dir: str | Path) -> Path:
    """Write ``trace.json`` and ``trace.png`` into ``out_dir``; return the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trace.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    plot_summary(summary, out / "trace.png")
    return out


@click.command("trace")
@click.argument("model")
@click.option(
    "--records",
    "records_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Request file: plain, CounterFact or zsRE records (JSON or JSON Lines).",
)
@click.option("--n", default=50, show_default=True, help="Number of records traced (first N).")
@click.option(
    "--out",
    "out_dir",
    default="trace_out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for trace.json and trace.png.",
)
@click.option("--noise", default=3.0, show_default=True, help="Noise std as a multiple of the embedding std.")
@click.option("--samples", default=10, show_default=True, help="Noise samples per prompt.")
@click.option("--window", default=1, show_default=True, help="Number of MLP layers restored together.")
@click.option("--width", default=3, show_default=True, help="Width of the best MLP window reported.")
@click.option("--device", default="", help="cpu, cuda, ... (default: cuda when available).")
@click.option("--seed", default=0, show_default=True, help="Seed of the noise samples.")
@user_errors
def command(
    model: str,
    records_path: str,
    n: int,
    out_dir: str,
    noise: float,
    samples: int,
    window: int,
    width: int,
    device: str,
    seed: int,
) -> None:
    """Causal trace of MODEL (models:/NAME@ALIAS, models:/NAME/V, a path, a hub id or "default") on the
    prompts of --records, towards each record's true object."""
    import torch

    from editflow.registry.resolve import load_any
    from editflow.registry.store import Registry
    from editflow.requests import load_requests
    from editflow.trace import best_window, trace_requests

    if n < 1 or samples < 1 or window < 1 or width < 1:
        fail("--n, --samples, --window and --width must be >= 1")
    torch.manual_seed(seed)
    requests = load_requests(records_path)[:n]
    handle = load_any(Registry(), model, device=device or None)
    _, summary = trace_requests(
        handle.model, handle.tokenizer, requests, handle.adapter, noise=noise, samples=samples, window=window, seed=seed
    )
    out = save_summary(summary, out_dir)
    click.echo(format_table(summary))
    click.echo(f"best {width} consecutive MLP layers: {list(best_window(summary, width))}")
    click.echo(f"wrote {out / 'trace.json'} and {out / 'trace.png'}")
