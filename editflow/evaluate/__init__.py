"""Evaluation of edits: CounterFact / zsRE / plain-request metrics, fluency and drift, batched.

Typical use::

    ev = Evaluator(handle, requests, heldout_texts=drift_texts(requests),
                   heldout_facts=default_heldout_facts(requests))
    key = ev.pre_key(fingerprint(handle.model))
    pre = ev.pre(known=find_pre_state(key))   # pre-edit answers and references, computed once
    log_pre_state(ev.pre_state, key)           # when it was computed here
    ...edit the model in place...
    post = ev.post(step=1)         # callable after every chunk
    table = fact_table(requests, pre, post); s = summary(pre, post)

Metric names: see :mod:`editflow.evaluate.report`.
"""

from editflow.evaluate.cache import (
    find_known,
    find_pre_state,
    known_key,
    load_pre_state,
    log_known,
    log_pre_state,
    save_pre_state,
)
from editflow.evaluate.data import default_heldout_facts, drift_texts, load_heldout_texts, unrelated_texts
from editflow.evaluate.drift import DriftReference, drift, drift_reference
from editflow.evaluate.evaluator import EvalResult, Evaluator, PreState
from editflow.evaluate.fluency import ngram_entropy, sample_texts, text_entropy, weighted_ngram_entropy, words
from editflow.evaluate.known import known_mask, select_known
from editflow.evaluate.metrics import KINDS, aggregate, check_outcomes, fact_metrics, harmonic_mean
from editflow.evaluate.probes import Check, auto_neighbor_texts
from editflow.evaluate.report import (
    METRIC_NAMES,
    fact_table,
    format_summary,
    history_frame,
    plot_curve,
    plot_probabilities,
    summary,
    write_report,
)
from editflow.evaluate.scoring import TargetScores, batched_forward, greedy_answers, score_ids, score_targets

__all__ = [
    "Check",
    "DriftReference",
    "EvalResult",
    "Evaluator",
    "KINDS",
    "METRIC_NAMES",
    "PreState",
    "TargetScores",
    "aggregate",
    "auto_neighbor_texts",
    "batched_forward",
    "check_outcomes",
    "default_heldout_facts",
    "drift",
    "drift_reference",
    "drift_texts",
    "fact_metrics",
    "fact_table",
    "find_known",
    "find_pre_state",
    "format_summary",
    "greedy_answers",
    "harmonic_mean",
    "history_frame",
    "known_key",
    "known_mask",
    "load_heldout_texts",
    "load_pre_state",
    "log_known",
    "log_pre_state",
    "ngram_entropy",
    "plot_curve",
    "plot_probabilities",
    "sample_texts",
    "save_pre_state",
    "score_ids",
    "score_targets",
    "select_known",
    "summary",
    "text_entropy",
    "unrelated_texts",
    "weighted_ngram_entropy",
    "words",
    "write_report",
]
