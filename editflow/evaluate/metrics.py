"""Metric definitions: pure functions from scored checks to per-fact and aggregate metrics.

A *check* is one prompt scored for a request's new target and/or its reference ("true") target. Its
``kind`` fixes which target must win and how it is counted (:data:`KINDS`):

- preference (CounterFact ES/PS/NS and the plain-request analogues): success when the winning side has
  the lower mean NLL; magnitude = P(winner) − P(other) with P = exp(−mean NLL); top-1 = every token of
  the winning side is the argmax;
- token_acc (zsRE): fraction of the winning side's tokens that are the argmax under teacher forcing;
- heldout (held-out known facts): preference for the true target (as neighbourhood), plus ``_prob``,
  the probability of the true target.

Per fact, a metric is the mean over that fact's checks of the kind; the aggregate is the mean over
facts that have such checks (as in the MEMIT ``summarize`` code), ×100. Held-out facts (fact −1) are
averaged over items. ``score`` is the harmonic mean of efficacy, paraphrase and neighborhood.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from editflow.evaluate.probes import HELDOUT_FACT


@dataclass(frozen=True)
class Kind:
    """How checks of one kind are counted: ``metric`` name, winning ``side`` ('new'/'true'), ``rule``."""

    metric: str
    side: str
    rule: str


KINDS: dict[str, Kind] = {
    "rewrite": Kind("efficacy", "new", "preference"),
    "paraphrase": Kind("paraphrase", "new", "preference"),
    "neighborhood": Kind("neighborhood", "true", "preference"),
    "neighborhood_auto": Kind("neighborhood_auto", "true", "preference"),
    "heldout": Kind("heldout", "true", "heldout"),
    "zsre_rewrite": Kind("zsre_efficacy", "new", "token_acc"),
    "zsre_paraphrase": Kind("zsre_paraphrase", "new", "token_acc"),
    "zsre_loc": Kind("zsre_specificity", "true", "token_acc"),
}
#: Extra per-check columns each rule produces, as metric-name suffixes.
RULE_SUFFIXES = {
    "preference": ("", "_magnitude", "_top1"),
    "token_acc": ("",),
    "heldout": ("", "_magnitude", "_top1", "_prob"),
}


def _other(side: str) -> str:
    return "true" if side == "new" else "new"


def check_outcomes(checks: pd.DataFrame) -> pd.DataFrame:
    """Long table (fact, metric, value) of every check's outcomes, per :data:`KINDS`.

    ``checks`` has columns fact, kind, nll_new, nll_true, top1_new, top1_true, acc_new, acc_true.
    """
    rows = []
    for kind, group in checks.groupby("kind", sort=False):
        spec = KINDS[kind]
        w, o = spec.side, _other(spec.side)
        nll_w, nll_o = group[f"nll_{w}"].to_numpy(float), group[f"nll_{o}"].to_numpy(float)
        top1 = group[f"top1_{w}"].to_numpy(float)
        preference = {"": nll_w < nll_o, "_magnitude": np.exp(-nll_w) - np.exp(-nll_o), "_top1": top1}
        values = {
            "preference": preference,
            "token_acc": {"": group[f"acc_{w}"].to_numpy(float)},
            "heldout": {**preference, "_prob": np.exp(-nll_w)},
        }[spec.rule]
        for suffix, v in values.items():
            rows.append(
                pd.DataFrame(
                    {
                        "fact": group["fact"].to_numpy(),
                        "metric": spec.metric + suffix,
                        "value": np.asarray(v, dtype=float),
                    }
                )
            )
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["fact", "metric", "value"])


def fact_metrics(outcomes: pd.DataFrame) -> pd.DataFrame:
    """Per-fact mean of each metric (fractions in [0, 1]; NaN where a fact has no such check)."""
    per_fact = outcomes[outcomes["fact"] != HELDOUT_FACT]
    if per_fact.empty:
        return pd.DataFrame()
    return per_fact.pivot_table(index="fact", columns="metric", values="value", aggfunc="mean")


def harmonic_mean(values: list[float]) -> float:
    """Harmonic mean (0 when any value is 0, NaN when any is NaN)."""
    if any(np.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def aggregate(facts: pd.DataFrame, outcomes: pd.DataFrame) -> dict[str, float]:
    """Aggregate metrics in % (means over facts; held-out facts over items) plus ``score``."""
    out = {str(m): float(facts[m].mean()) * 100 for m in facts.columns if facts[m].notna().any()}
    heldout = outcomes[outcomes["fact"] == HELDOUT_FACT]
    for metric, group in heldout.groupby("metric"):
        out[str(metric)] = float(group["value"].mean()) * 100
    if all(k in out for k in ("efficacy", "paraphrase", "neighborhood")):
        out["score"] = harmonic_mean([out["efficacy"], out["paraphrase"], out["neighborhood"]])
    return out
