"""Saving a pre-edit evaluation (:class:`~editflow.evaluate.evaluator.PreState`) and finding it in MLflow.

On disk a state is a directory: ``pre.json`` (inputs digest, metrics, per-fact table, checks with
their token ids, the drift reference's sequences and sums) and ``drift.npz`` (the reference's top-k
ids and log-probabilities). In MLflow it is the artifact folder :data:`ARTIFACT_PATH` of the run that
computed it, which carries the tag ``editflow.eval_pre.<key[:32]>`` = ``computed``.

The known held-out facts of a base model (:func:`~editflow.evaluate.known.select_known`) are cached the
same way, as ``eval_known/known.json`` under the tag ``editflow.eval_known.<key[:32]>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from editflow.evaluate.drift import DriftReference
from editflow.evaluate.evaluator import EvalResult, PreState
from editflow.evaluate.known import MAX_RANK
from editflow.evaluate.probes import Check
from editflow.requests import EditRequest, requests_digest

ARTIFACT_PATH = "eval_pre"
TAG_PREFIX = "editflow.eval_pre."


def cache_tag(key: str) -> str:
    """MLflow tag marking the run that computed the pre-edit state with cache ``key``."""
    return TAG_PREFIX + key[:32]


def _frame_to_json(df: pd.DataFrame) -> dict:
    return {
        "columns": list(df.columns),
        "index": [int(i) for i in df.index],
        "data": [
            [None if isinstance(v, float) and np.isnan(v) else v for v in row] for row in df.itertuples(index=False)
        ],
    }


def _numeric_with_gaps(col: pd.Series) -> bool:
    return col.dtype == object and col.map(lambda v: v is None or isinstance(v, (int, float))).all()


def _frame_from_json(d: dict) -> pd.DataFrame:
    df = pd.DataFrame(d["data"], columns=d["columns"], index=d["index"])
    for name in df.columns:
        if _numeric_with_gaps(df[name]):  # NaNs were written as null
            df[name] = df[name].astype(float)
    return df


def _check_to_json(c: Check) -> list:
    return [c.fact, c.kind, c.text, None if c.new is None else list(c.new), None if c.true is None else list(c.true)]


def _check_from_json(v: list) -> Check:
    return Check(int(v[0]), v[1], v[2], None if v[3] is None else tuple(v[3]), None if v[4] is None else tuple(v[4]))


def save_pre_state(state: PreState, directory: str | os.PathLike) -> Path:
    """Write ``state`` into ``directory`` (created); return it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    r, ref = state.result, state.drift_ref
    doc = {
        "inputs": state.inputs,
        "phase": r.phase,
        "step": r.step,
        "metrics": r.metrics,
        "facts": _frame_to_json(r.facts),
        "checks_table": _frame_to_json(r.checks),
        "checks": [_check_to_json(c) for c in state.checks],
        "drift": None if ref is None else {"seqs": ref.seqs, "nll_sum": ref.nll_sum, "n_tokens": ref.n_tokens},
    }
    (out / "pre.json").write_text(json.dumps(doc))
    if ref is not None:
        np.savez(out / "drift.npz", ids=torch.cat(ref.topk_ids).numpy(), logp=torch.cat(ref.topk_logp).numpy())
    return out


def load_pre_state(directory: str | os.PathLike) -> PreState:
    """Read a state written by :func:`save_pre_state`."""
    src = Path(directory)
    doc = json.loads((src / "pre.json").read_text())
    ref = None
    if doc["drift"] is not None:
        arrays = np.load(src / "drift.npz")
        sizes = [len(s) - 1 for s in doc["drift"]["seqs"]]
        ref = DriftReference(
            seqs=doc["drift"]["seqs"],
            topk_ids=list(torch.from_numpy(arrays["ids"]).split(sizes)),
            topk_logp=list(torch.from_numpy(arrays["logp"]).split(sizes)),
            nll_sum=float(doc["drift"]["nll_sum"]),
            n_tokens=int(doc["drift"]["n_tokens"]),
        )
    facts = _frame_from_json(doc["facts"])
    result = EvalResult(
        doc["phase"],
        doc["step"],
        {k: float(v) for k, v in doc["metrics"].items()},
        facts,
        _frame_from_json(doc["checks_table"]),
    )
    return PreState(doc["inputs"], result, [_check_from_json(c) for c in doc["checks"]], ref)


def find_pre_state(key: str) -> PreState | None:
    """The pre-edit state logged under ``key`` by any run of the current tracking store, else None."""
    import mlflow

    tag = cache_tag(key)
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`{tag}` = 'computed'", max_results=1, output_format="list"
    )
    if not runs:
        return None
    local = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path=ARTIFACT_PATH)
    return load_pre_state(local)


def log_pre_state(state: PreState, key: str) -> None:
    """Log ``state`` to the active MLflow run (artifacts :data:`ARTIFACT_PATH`) and tag it with ``key``."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifacts(str(save_pre_state(state, tmp)), ARTIFACT_PATH)
    mlflow.set_tags({cache_tag(key): "computed", TAG_PREFIX + "key": key})


# --------------------------------------------------------------------------- known facts, per base model

KNOWN_ARTIFACT = "eval_known/known.json"
KNOWN_TAG_PREFIX = "editflow.eval_known."


def known_key(fingerprint: str, candidates: Sequence[EditRequest], max_rank: int = MAX_RANK) -> str:
    """Cache key of :func:`~editflow.evaluate.known.select_known` on the base with weight ``fingerprint``."""
    return hashlib.sha256(f"{fingerprint}|{requests_digest(candidates)}|{max_rank}".encode()).hexdigest()


def find_known(key: str) -> list[str] | None:
    """Known-fact texts logged under ``key`` by any run of the current tracking store, else None."""
    import mlflow

    tag = KNOWN_TAG_PREFIX + key[:32]
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`{tag}` = 'computed'", max_results=1, output_format="list"
    )
    if not runs:
        return None
    return list(mlflow.artifacts.load_dict(f"runs:/{runs[0].info.run_id}/{KNOWN_ARTIFACT}")["known"])


def log_known(texts: Sequence[str], key: str) -> None:
    """Log known-fact texts to the active MLflow run and tag it with ``key``."""
    import mlflow

    mlflow.log_dict({"key": key, "known": list(texts)}, KNOWN_ARTIFACT)
    mlflow.set_tag(KNOWN_TAG_PREFIX + key[:32], "computed")
