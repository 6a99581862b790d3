"""Evaluation outputs: the per-fact table, the summary with stable metric names, exports and plots.

Summary keys are ``pre/<name>`` (unedited model) and ``post/<name>`` (after the edit, or after the
last chunk); sequential runs also keep one ``post`` result per chunk (``history``). Names follow the
MEMIT/ROME papers so numbers compare with their tables. Percentages are means over facts ×100;
magnitudes are differences of probabilities P = exp(−mean NLL of the target tokens), in points.

| name | meaning | unit |
|---|---|---|
| `efficacy` | ES: rewrite prompt, NLL(new) < NLL(true) (true = `target_true`, else the pre-edit answer) | % |
| `efficacy_magnitude` | EM: P(new) − P(true) on the rewrite prompt | points |
| `efficacy_top1` | every token of the new target is the argmax on the rewrite prompt | % |
| `paraphrase` | PS: as `efficacy`, over `paraphrase_prompts` | % |
| `paraphrase_magnitude` | PM: P(new) − P(true) over paraphrases | points |
| `paraphrase_top1` | new target top-1 over paraphrases | % |
| `neighborhood` | NS: `neighborhood_prompts`, NLL(true) < NLL(new) | % |
| `neighborhood_magnitude` | NM: P(true) − P(new) over neighbourhood prompts | points |
| `neighborhood_top1` | true target still top-1 over neighbourhood prompts | % |
| `score` | S: harmonic mean of `efficacy`, `paraphrase`, `neighborhood` | % |
| `neighborhood_auto` | plain requests: the prompt with other requests' subjects keeps its pre-edit answer over the new target | % |
| `neighborhood_auto_magnitude` | P(pre-edit answer) − P(new) on those prompts | points |
| `neighborhood_auto_top1` | pre-edit answer still top-1 on those prompts | % |
| `heldout` | held-out known facts (:mod:`editflow.evaluate.known`; 100 before the edit) still preferring `target_true` over `target_new` | % |
| `heldout_magnitude` | P(true) − P(new) over those facts | points |
| `heldout_top1` | `target_true` top-1 on those facts | % |
| `heldout_prob` | mean probability of the held-out facts' `target_true` | % |
| `zsre_efficacy` | zsRE: token top-1 accuracy of `target_new` after the question (teacher forcing) | % |
| `zsre_paraphrase` | zsRE: same after the rephrased question | % |
| `zsre_specificity` | zsRE: token top-1 accuracy of `loc_ans` after `loc` | % |
| `fluency` | GE: weighted n-gram entropy of sampled texts ×100 (:mod:`editflow.evaluate.fluency`), on at most 50 facts (a seeded sample beyond, the same before and after; `editflow eval --fluency-max`) | ×100 bits |
| `drift_ppl` | perplexity on the held-out text slice: the first 1,024 tokens of held-out text that mention no edited subject (of the batch or its lineage) and no bundled record's subject | — |
| `drift_ppl_rel` | post only: ppl_post / ppl_pre − 1 | ratio |
| `drift_kl` | post only: mean KL(pre ‖ post) of next-token distributions (top-k coarsening) | nats |
| `n_facts`, `n_heldout` | requests evaluated, held-out facts kept | count |

A metric is absent when no request carries the material it needs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from editflow.evaluate.evaluator import EvalResult
from editflow.requests import EditRequest

METRIC_NAMES = (
    "efficacy",
    "efficacy_magnitude",
    "efficacy_top1",
    "paraphrase",
    "paraphrase_magnitude",
    "paraphrase_top1",
    "neighborhood",
    "neighborhood_magnitude",
    "neighborhood_top1",
    "score",
    "neighborhood_auto",
    "neighborhood_auto_magnitude",
    "neighborhood_auto_top1",
    "heldout",
    "heldout_magnitude",
    "heldout_top1",
    "heldout_prob",
    "zsre_efficacy",
    "zsre_paraphrase",
    "zsre_specificity",
    "fluency",
    "drift_ppl",
    "drift_ppl_rel",
    "drift_kl",
    "n_facts",
    "n_heldout",
)
#: Metrics drawn on the per-chunk curve (all in %).
CURVE_METRICS = (
    "efficacy",
    "paraphrase",
    "neighborhood",
    "neighborhood_auto",
    "heldout",
    "score",
    "zsre_efficacy",
    "zsre_paraphrase",
    "zsre_specificity",
)


def _ordered(metrics: dict[str, float]) -> list[str]:
    known = [m for m in METRIC_NAMES if m in metrics]
    return known + sorted(set(metrics) - set(known))


def summary(*results: EvalResult) -> dict[str, float]:
    """``phase/name`` → value for each result, in :data:`METRIC_NAMES` order (later results win)."""
    out: dict[str, float] = {}
    for r in results:
        out.update({f"{r.phase}/{k}": r.metrics[k] for k in _ordered(r.metrics)})
    return out


def fact_table(requests: Sequence[EditRequest], pre: EvalResult, post: EvalResult | None = None) -> pd.DataFrame:
    """One row per request: identity, then each per-fact measure before and after side by side
    (``pre_p_new``, ``post_p_new``, ...; probabilities first, so a table view such as the MLflow UI's
    shows them without scrolling), then ``case_id``."""
    ident = pd.DataFrame(
        [
            {
                "case_id": r.case_id,
                "subject": r.subject,
                "prompt": r.prompt,
                "target_new": r.target_new,
                "target_true": r.target_true,
            }
            for r in requests
        ]
    )
    results = [res for res in (pre, post) if res is not None]
    parts = [ident]
    for res in results:
        parts.append(res.facts.reindex(range(len(requests))).add_prefix(f"{res.phase}_").reset_index(drop=True))
    measures = list(dict.fromkeys(c for res in results for c in res.facts.columns))
    measures.sort(key=lambda c: not c.startswith("p_"))  # stable: P(new), P(true), then the metrics
    paired = [f"{res.phase}_{m}" for m in measures for res in results if m in res.facts.columns]
    return pd.concat(parts, axis=1)[[*ident.columns.drop("case_id"), *paired, "case_id"]]


def history_frame(history: Sequence[EvalResult]) -> pd.DataFrame:
    """One row per post-edit evaluation (chunk): step and all metrics."""
    return pd.DataFrame([{"step": r.step if r.step is not None else i, **r.metrics} for i, r in enumerate(history)])


def _json_safe(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value


def plot_probabilities(table: pd.DataFrame, path: str | os.PathLike, max_facts: int = 40) -> Path:
    """Per fact (up to ``max_facts``), P(true target) and P(new target) on the rewrite prompt before and
    after the edit: one labelled row per fact, arrows from before to after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = table.head(max_facts)
    n = max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * n))
    y = np.arange(len(rows))[::-1]
    for side, colour in (("new", "tab:green"), ("true", "tab:red")):
        before = rows.get(f"pre_p_{side}", pd.Series(np.nan, index=rows.index)).to_numpy(float)
        after = rows.get(f"post_p_{side}", pd.Series(before, index=rows.index)).to_numpy(float)
        ax.scatter(before, y, marker="o", facecolors="none", edgecolors=colour, label=f"P({side}) before")
        ax.scatter(after, y, marker="o", color=colour, label=f"P({side}) after")
        for b, a, yy in zip(before, after, y):
            if np.isfinite(b) and np.isfinite(a):
                ax.annotate(
                    "",
                    xy=(a, yy),
                    xytext=(b, yy),
                    arrowprops={"arrowstyle": "->", "color": colour, "alpha": 0.5, "lw": 0.8},
                )
    labels = [
        f"{str(r.subject)[:28]}: {str(r.target_true or '?')[:14]} → {str(r.target_new)[:14]}" for r in rows.itertuples()
    ]
    ax.set_yticks(y, labels, fontsize=7)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.8, n - 0.2), xlabel="probability of the target on the rewrite prompt")
    ax.set_title(f"Per fact: true and new target, before and after the edit ({len(rows)} of {len(table)})", pad=22)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_curve(history: pd.DataFrame, path: str | os.PathLike, metrics: Sequence[str] = CURVE_METRICS) -> Path:
    """Metric (%) per chunk in sequential mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in metrics:
        if m in history and history[m].notna().any():
            ax.plot(history["step"], history[m], marker="o", label=m)
    ax.set(xlabel="chunk", ylabel="%", ylim=(0, 100), title="Metrics after each chunk")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


#: The per-fact figure and the chunk curve, by the names every writer gives them.
PROBABILITIES_PNG = "prob_new_pre_vs_post.png"
CURVE_PNG = "chunk_curve.png"


def write_report(
    out_dir: str | os.PathLike,
    table: pd.DataFrame,
    summary_: dict[str, float],
    history: Sequence[EvalResult] = (),
    facts_json: bool = True,
) -> dict[str, Path]:
    """Write summary.json, facts.csv, facts.json (unless ``facts_json`` is false: an MLflow run logs
    it as a table instead), the P(new) figure (and history.csv and the chunk curve when there is more
    than one post-edit result) to ``out_dir``; return the paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "facts_csv": out / "facts.csv"}
    paths["summary"].write_text(json.dumps({k: _json_safe(v) for k, v in summary_.items()}, indent=2) + "\n")
    table.to_csv(paths["facts_csv"], index=False)
    if facts_json:
        paths["facts_json"] = out / "facts.json"
        table.to_json(paths["facts_json"], orient="records", indent=2, force_ascii=False)
    paths["probabilities"] = plot_probabilities(table, out / PROBABILITIES_PNG)
    if len(history) > 1:
        frame = history_frame(history)
        frame.to_csv(out / "history.csv", index=False)
        paths["history"] = out / "history.csv"
        paths["curve"] = plot_curve(frame, out / CURVE_PNG)
    return paths


def format_summary(summary_: dict[str, float]) -> str:
    """Compact text table: one row per metric name, pre and post columns."""
    names = _ordered({k.split("/", 1)[1]: v for k, v in summary_.items()})
    rows = [f"{'metric':<28}{'pre':>10}{'post':>10}"]
    for n in names:
        cells = [summary_.get(f"{p}/{n}") for p in ("pre", "post")]
        rows.append(f"{n:<28}" + "".join(f"{'—' if v is None or v != v else f'{v:.2f}':>10}" for v in cells))
    return "\n".join(rows)
