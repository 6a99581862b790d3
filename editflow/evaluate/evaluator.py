"""The :class:`Evaluator`: pre-edit references computed once, post-edit evaluation callable per chunk.

Everything :meth:`Evaluator.post` needs from :meth:`Evaluator.pre` is a :class:`PreState`; pass a
saved one back as ``pre(known=...)`` to skip the pre-edit evaluation (:mod:`editflow.evaluate.cache`
stores it, keyed by :meth:`Evaluator.pre_key`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from torch import nn

from editflow import progress
from editflow.evaluate.drift import DriftReference, drift, drift_reference
from editflow.evaluate.fluency import fact_fluency
from editflow.evaluate.known import MAX_RANK, known_mask
from editflow.evaluate.metrics import aggregate, check_outcomes, fact_metrics
from editflow.evaluate.probes import (
    HELDOUT_FACT,
    Check,
    answer_queries,
    build_checks,
    fitting_probes,
    heldout_probes,
    request_probes,
)
from editflow.evaluate.scoring import greedy_answers, score_ids
from editflow.requests import EditRequest, requests_digest
from editflow.tokens import encode, model_positions, pad_id

REWRITE_KINDS = ("rewrite", "zsre_rewrite")
#: Facts fluency is sampled on at most (a seeded sample beyond). Generation was half of an evaluation's
#: cost at 100 facts on SmolLM2-135M; there a 50-fact sample's standard error is 0.5 % of the figure
#: (0.8 % of it on the pre-to-post change).
FLUENCY_MAX = 50
#: Version of what a :class:`PreState` holds; part of every cache key.
PRE_FORMAT = "editflow-eval-pre/1"


@dataclass
class EvalResult:
    """One evaluation of the model state: ``metrics`` (unprefixed, see :mod:`editflow.evaluate.report`),
    ``facts`` (one row per evaluated request, index = request index) and the scored ``checks``."""

    phase: str
    step: int | None
    metrics: dict[str, float]
    facts: pd.DataFrame
    checks: pd.DataFrame = field(repr=False)

    @property
    def summary(self) -> dict[str, float]:
        """Metrics under stable ``phase/name`` keys."""
        return {f"{self.phase}/{k}": v for k, v in self.metrics.items()}


@dataclass
class PreState:
    """The pre-edit evaluation: its ``result``, the scored ``checks`` (with the pre-edit answers) and
    the drift reference. ``inputs`` is :meth:`Evaluator.inputs_digest` of the evaluator it came from."""

    inputs: str
    result: EvalResult
    checks: list[Check]
    drift_ref: DriftReference | None


def _unpack(handle_or_pair: object) -> tuple[nn.Module, object]:
    if isinstance(handle_or_pair, tuple):
        return handle_or_pair
    return handle_or_pair.model, handle_or_pair.tokenizer  # type: ignore[attr-defined]


class Evaluator:
    """Evaluate ``requests`` on the current state of a model, before and after editing.

    ``handle_or_model_tokenizer`` is a :class:`~editflow.models.ModelHandle` or ``(model, tokenizer)``;
    the model is read at each call, so edit it in place between :meth:`pre` and :meth:`post`.
    ``heldout_texts`` feed drift; ``heldout_facts`` (candidates with ``target_true`` and ``target_new``)
    the held-out specificity: the first ``heldout_max`` of them the unedited model knows
    (:mod:`editflow.evaluate.known`, rank bound ``heldout_rank``; ``known_texts``, the texts of known
    facts, skips that pass), or simply the first ``heldout_max`` when ``heldout_known_only`` is off.
    Fluency samples texts for at most ``fluency_max`` facts (a seeded sample, the same before and after;
    0: every fact). ``batch_rows`` is the micro-batch row budget, ``one_by_one`` the per-prompt reference.
    """

    def __init__(
        self,
        handle_or_model_tokenizer: object,
        requests: Sequence[EditRequest],
        *,
        heldout_texts: Sequence[str] = (),
        heldout_facts: Sequence[EditRequest] = (),
        heldout_known_only: bool = True,
        heldout_max: int = 100,
        heldout_rank: int = MAX_RANK,
        known_texts: Collection[str] | None = None,
        n_auto_neighbors: int = 5,
        fluency: bool = True,
        fluency_prompts: int = 1,
        fluency_tokens: int = 90,
        fluency_max: int = FLUENCY_MAX,
        seed: int = 0,
        drift_tokens: int = 1024,
        drift_top_k: int = 64,
        batch_rows: int = 64,
        padding_side: str = "right",
        one_by_one: bool = False,
    ):
        self.model, self.tokenizer = _unpack(handle_or_model_tokenizer)
        self.requests = list(requests)
        self.heldout_texts, self.heldout_facts = list(heldout_texts), list(heldout_facts)
        self.heldout_known_only, self.n_auto_neighbors = heldout_known_only, n_auto_neighbors
        self.heldout_max, self.heldout_rank = heldout_max, heldout_rank
        self.known_texts = None if known_texts is None else frozenset(known_texts)
        self.fluency, self.fluency_prompts, self.fluency_tokens = fluency, fluency_prompts, fluency_tokens
        self.fluency_max = fluency_max
        self.seed, self.drift_tokens, self.drift_top_k = seed, drift_tokens, drift_top_k
        self.batching = {"batch_rows": batch_rows, "padding_side": padding_side, "one_by_one": one_by_one}
        self.checks: list[Check] | None = None
        self.drift_ref: DriftReference | None = None
        self.pre_result: EvalResult | None = None
        self.history: list[EvalResult] = []
        self.skipped_probes = 0  # evaluation prompts longer than the model's positions (not scored)

    # ------------------------------------------------------------------ references (once)

    def inputs_digest(self) -> str:
        """SHA-256 of everything the pre-edit evaluation depends on except the model's weights."""
        settings = {
            "format": PRE_FORMAT,
            "requests": requests_digest(self.requests),
            "heldout_facts": requests_digest(self.heldout_facts),
            "heldout_texts": hashlib.sha256("\n".join(self.heldout_texts).encode()).hexdigest(),
            "known_texts": None if self.known_texts is None else sorted(self.known_texts),
            "heldout": [self.heldout_known_only, self.heldout_max, self.heldout_rank],
            "n_auto_neighbors": self.n_auto_neighbors,
            "fluency": [self.fluency, self.fluency_prompts, self.fluency_tokens, self.seed]
            + ([self.fluency_max] if 0 < self.fluency_max < len(self.requests) else []),
            "drift": [self.drift_tokens, self.drift_top_k],
            "batching": self.batching,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def pre_key(self, fingerprint: str) -> str:
        """Cache key of the pre-edit evaluation of the model with weight ``fingerprint``
        (:func:`editflow.models.fingerprint`)."""
        return hashlib.sha256(f"{fingerprint}|{self.inputs_digest()}".encode()).hexdigest()

    def heldout_selection(self) -> list[EditRequest]:
        """The held-out facts evaluated: known ones (one scoring pass unless ``known_texts``), capped."""
        facts = [f for f in self.heldout_facts if f.target_true and f.target_new]
        if self.heldout_known_only:
            known = (
                [f.text in self.known_texts for f in facts]
                if self.known_texts is not None
                else known_mask(self.model, self.tokenizer, facts, max_rank=self.heldout_rank, **self.batching)
            )
            facts = [f for f, k in zip(facts, known) if k]
        return facts[: self.heldout_max]

    def _build_checks(self) -> list[Check]:
        tok = self.tokenizer
        probes = request_probes(tok, self.requests, self.n_auto_neighbors) + heldout_probes(
            tok, self.heldout_selection()
        )
        positions = model_positions(self.model)
        probes, self.skipped_probes = fitting_probes(tok, probes, positions)
        if self.skipped_probes:
            progress.note(
                f"{self.skipped_probes} evaluation prompt(s) longer than the model's {positions} positions "
                "are not scored"
            )
        queries = sorted(set(answer_queries(probes)))
        answers = greedy_answers(
            self.model, [encode(tok, t) for t, _ in queries], [n for _, n in queries], pad_id(tok), **self.batching
        )
        return build_checks(probes, dict(zip(queries, answers)))

    # ------------------------------------------------------------------ one evaluation

    def _score(self, checks: Sequence[Check]) -> pd.DataFrame:
        """Score both sides of every check in one batched call."""
        pairs, where = [], []
        for j, c in enumerate(checks):
            for side in ("new", "true"):
                ids = getattr(c, side)
                if ids:
                    pairs.append((encode(self.tokenizer, c.text), ids))
                    where.append((j, side))
        s = score_ids(self.model, pairs, pad_id(self.tokenizer), **self.batching)
        table = pd.DataFrame(
            {"fact": [c.fact for c in checks], "kind": [c.kind for c in checks], "text": [c.text for c in checks]}
        )
        for side in ("new", "true"):
            k = [n for n, (_, sd) in enumerate(where) if sd == side]
            rows = [where[n][0] for n in k]
            for name, values in (("nll", s.nll), ("top1", s.top1.astype(float)), ("acc", s.token_acc)):
                col = np.full(len(checks), np.nan)
                col[rows] = values[k]
                table[f"{name}_{side}"] = col
        return table

    def fluency_facts(self) -> list[int]:
        """The facts fluency is sampled on: all, or a seeded sample of ``fluency_max`` (the same
        before and after the edit)."""
        n = len(self.requests)
        if self.fluency_max <= 0 or n <= self.fluency_max:
            return list(range(n))
        return sorted(random.Random(self.seed).sample(range(n), self.fluency_max))

    def _fluency(self, facts: Sequence[int]) -> pd.Series:
        """Per-fact weighted n-gram entropy ×100 of sampled texts (generation prompts, else the prompt)."""
        per_fact = fact_fluency(
            self.model,
            self.tokenizer,
            [self.requests[i] for i in facts],
            prompts_per_fact=self.fluency_prompts,
            new_tokens=self.fluency_tokens,
            seed=self.seed,
            batch_rows=self.batching["batch_rows"],
        )
        per_fact.index = [facts[j] for j in per_fact.index]
        return per_fact

    def _evaluate(self, phase: str, step: int | None, facts: Sequence[int] | None) -> EvalResult:
        assert self.checks is not None
        chosen = set(range(len(self.requests)) if facts is None else facts)
        checks = [c for c in self.checks if c.fact in chosen or c.fact == HELDOUT_FACT]
        table = self._score(checks)
        outcomes = check_outcomes(table)
        per_fact = fact_metrics(outcomes).reindex(sorted(chosen))
        rewrite = table[table["kind"].isin(REWRITE_KINDS)].groupby("fact").first()
        per_fact["p_new"] = np.exp(-rewrite["nll_new"])
        per_fact["p_true"] = np.exp(-rewrite["nll_true"])
        metrics = aggregate(per_fact.drop(columns=["p_new", "p_true"]), outcomes)
        sampled = [i for i in self.fluency_facts() if i in chosen] if self.fluency else []
        if sampled:
            per_fact["fluency"] = self._fluency(sampled)
            metrics["fluency"] = float(per_fact["fluency"].mean())
        metrics.update(self._drift(phase))
        metrics["n_facts"] = float(len(chosen))
        metrics["n_heldout"] = float((table["fact"] == HELDOUT_FACT).sum())
        return EvalResult(phase, step, metrics, per_fact, table)

    def _drift(self, phase: str) -> dict[str, float]:
        if self.drift_ref is None:
            return {}
        if phase == "pre":
            return {"drift_ppl": self.drift_ref.ppl}
        d = drift(self.model, self.tokenizer, self.drift_ref, one_by_one=self.batching["one_by_one"])
        return {"drift_ppl": d["ppl"], "drift_ppl_rel": d["ppl_rel"], "drift_kl": d["kl"]}

    # ------------------------------------------------------------------ public

    def pre(self, known: PreState | None = None) -> EvalResult:
        """Evaluate the unedited model; computes pre-edit answers and the drift reference (once).

        ``known``: a :class:`PreState` saved from an evaluator with the same :meth:`inputs_digest` on
        the same model (look it up by :meth:`pre_key`); it is used instead of computing anything.
        """
        if known is not None and self.pre_result is None:
            if known.inputs != self.inputs_digest():
                raise ValueError("the saved pre-edit state was computed for other requests or settings")
            self.checks, self.drift_ref, self.pre_result = list(known.checks), known.drift_ref, known.result
        if self.pre_result is None:
            self.checks = self._build_checks()
            if self.heldout_texts:
                self.drift_ref = drift_reference(
                    self.model,
                    self.tokenizer,
                    self.heldout_texts,
                    max_tokens=self.drift_tokens,
                    top_k=self.drift_top_k,
                    one_by_one=self.batching["one_by_one"],
                )
            self.pre_result = self._evaluate("pre", None, None)
        return self.pre_result

    @property
    def pre_state(self) -> PreState:
        """What :meth:`pre` computed, to save (:func:`editflow.evaluate.cache.save_pre_state`)."""
        result = self.pre()
        assert self.checks is not None
        return PreState(self.inputs_digest(), result, list(self.checks), self.drift_ref)

    def post(self, step: int | None = None, facts: Sequence[int] | None = None) -> EvalResult:
        """Evaluate the current (edited) model; ``facts`` restricts to the requests edited so far."""
        self.pre()
        result = self._evaluate("post", step, facts)
        self.history.append(result)
        return result
