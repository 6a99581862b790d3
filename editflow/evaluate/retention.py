"""Retention: do the facts edited into earlier versions of a lineage still hold?

Each earlier fact is scored as its own edit is (efficacy: P(new) > P(true) on the rewrite prompt, or
zsRE token accuracy; top-1; paraphrases where the record has them), on the current model. Only the
rewrite and paraphrase checks run: neighbourhood and fluency belong to the batch's own evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from editflow.requests import EditRequest

#: (metric, per-fact column for records with a true target, column for those without one).
#: Without ``target_true`` the reference answer would be the current model's own, so such a fact
#: holds when its new target is the top-1 answer.
_COLUMNS = (
    ("retention", ("efficacy", "zsre_efficacy"), ("efficacy_top1", "zsre_efficacy")),
    ("retention_top1", ("efficacy_top1", "zsre_efficacy"), ("efficacy_top1", "zsre_efficacy")),
    ("retention_paraphrase", ("paraphrase", "zsre_paraphrase"), ("paraphrase_top1", "zsre_paraphrase")),
)


def _rewrite_only(r: EditRequest) -> EditRequest:
    return dataclasses.replace(
        r, neighborhood_prompts=(), attribute_prompts=(), generation_prompts=(), loc=None, loc_ans=None
    )


def retention_metrics(
    handle: object, facts: Sequence[EditRequest], n_total: int | None = None, seed: int = 0
) -> dict[str, float]:
    """``retention``, ``retention_top1`` and ``retention_paraphrase`` (in %) of ``facts`` on the
    model as it is now, plus ``n_retention`` (facts scored) and ``n_lineage_facts`` (facts held).

    With a seeded sample of n facts out of more, the standard error of ``retention`` is at most
    √(p(1−p)/n): 2.2 points at n = 500 and p = 0.5, 1.3 points at p = 0.9."""
    from editflow.evaluate.evaluator import Evaluator

    if not facts:
        return {}
    result = Evaluator(handle, [_rewrite_only(r) for r in facts], n_auto_neighbors=0, fluency=False, seed=seed).pre()
    table = result.facts
    has_true = np.array([bool(r.target_true) for r in facts])
    out: dict[str, float] = {}
    for name, with_true, without_true in _COLUMNS:
        values = np.concatenate(
            [_first_present(table, with_true)[has_true], _first_present(table, without_true)[~has_true]]
        )
        values = values[~np.isnan(values)]
        if len(values):
            out[name] = float(values.mean()) * 100
    out["n_retention"] = float(len(facts))
    out["n_lineage_facts"] = float(n_total if n_total is not None else len(facts))
    return out


def _first_present(table, columns: tuple[str, ...]) -> np.ndarray:
    """Per fact, the first of ``columns`` the fact has a value in (NaN where none)."""
    present = [c for c in columns if c in table.columns]
    if not present:
        return np.full(len(table), np.nan)
    return table[present].bfill(axis=1).iloc[:, 0].to_numpy(float)
