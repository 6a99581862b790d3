"""What a version carries for the edits after it: its edit state, its facts and the root's references.

* The **edit state** (:mod:`editflow.edit_state`) is logged as an artifact of the run that produced the
  version, and its SHA-256, size and key count go into the version's ``editflow.json``; reading it back
  checks the digest, so a corrupt or swapped file stops the next edit before any work.
* The version's **facts** (the parsed requests, every field) are logged beside it as ``facts.jsonl``,
  so retention can be measured on the whole lineage with paraphrases, on any MLflow backend.
* The **root references** (held-out perplexity and known-fact accuracy of the unedited root base) are
  carried from version to version in ``editflow.json``, so the gate can compare each version with the root.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

from editflow import progress
from editflow.edit_state import EditState, EditStateError, load_state, save_state
from editflow.registry.schema import (
    DRIFT_SLICE,
    DRIFT_SLICE_KEY,
    EDIT_STATE_KEY,
    LEGACY_EDIT_STATE_SHA256_TAG,
    LEGACY_ROOT_REFERENCE_TAGS,
    PARENT_VERSION_TAG,
    ROOT_REFERENCE_METRICS,
    ROOT_REFERENCES_KEY,
    RUN_ID_KEY,
    is_edit,
)
from editflow.registry.store import Registry
from editflow.requests import EditRequest

STATE_DIR = "edit_state"
FACTS_FILE = "facts.jsonl"
FACTS_DIR = "lineage"
#: Retention is measured on at most this many earlier facts (a seeded sample beyond).
RETENTION_CAP = 500


# --------------------------------------------------------------------------- edit state


def log_state(state: EditState, dtype: str, parent_sha256: str | None) -> dict:
    """Log ``state`` in the active run; return its record (sha256, bytes, layers, n_keys, ...)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="editflow-state-") as tmp:
        record = save_state(state, tmp, dtype=dtype, parent_sha256=parent_sha256)
        mlflow.log_artifact(str(Path(tmp) / record["file"]), STATE_DIR)
    return record


def state_entry(record: dict) -> dict:
    """The ``editflow.json`` entry of a logged state record: what verifies it and what it costs."""
    return {k: record[k] for k in ("sha256", "bytes", "n_keys", "dtype")}


def read_state(reg: Registry, tags: dict[str, str], meta: dict) -> tuple[EditState, str | None]:
    """The edit state of the version with ``tags`` and ``editflow.json`` ``meta``, and its digest
    (empty for a base).

    Raises :class:`~editflow.edit_state.EditStateError` when the artifact is missing or its digest
    does not match the one recorded.
    """
    if not is_edit(tags):
        return EditState(), None
    sha = (meta.get(EDIT_STATE_KEY) or {}).get("sha256") or tags.get(LEGACY_EDIT_STATE_SHA256_TAG)
    if not sha:
        progress.note(
            "editflow: this version has no edit state (registered before editflow kept one); "
            "the edit preserves only the keys of its own batch"
        )
        return EditState(), None
    run_id = meta.get(RUN_ID_KEY)
    with tempfile.TemporaryDirectory(prefix="editflow-state-") as tmp:
        try:
            local = reg.download(f"runs:/{run_id}/{STATE_DIR}", tmp)
        except Exception as exc:  # noqa: BLE001 - any failure to fetch is a missing state
            raise EditStateError(f"edit state of run {run_id} cannot be read: {str(exc)[:200]}") from None
        record = {"sha256": sha, "file": "edit_state.safetensors"}
        return load_state(local, record), sha


# --------------------------------------------------------------------------- facts


def log_facts(requests: Sequence[EditRequest]) -> None:
    """Log the parsed requests of this run as ``lineage/facts.jsonl``."""
    import mlflow

    text = "\n".join(json.dumps(r.to_dict(), ensure_ascii=False) for r in requests) + "\n"
    mlflow.log_text(text, f"{FACTS_DIR}/{FACTS_FILE}")


def own_requests(reg: Registry, tags: dict[str, str], run_id: str | None) -> list[EditRequest]:
    """The requests edited into the version with ``tags`` by run ``run_id`` (empty for a base, or for
    a version from before facts were logged; a store that cannot be read raises)."""
    from editflow.registry.versions import is_not_found

    if not is_edit(tags) or not run_id:
        return []
    try:
        listed = {Path(a.path).name for a in reg.client.list_artifacts(run_id, FACTS_DIR)}
    except Exception as exc:
        if is_not_found(exc):  # the run is gone
            return []
        raise
    if FACTS_FILE not in listed:  # a version from before facts were logged
        return []
    text = reg.read_text(f"runs:/{run_id}/{FACTS_DIR}/{FACTS_FILE}")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    fields = {f.name for f in dataclasses.fields(EditRequest)}
    return [
        EditRequest(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in row.items() if k in fields})
        for row in rows
    ]


def ancestry(reg: Registry, name: str, version: int) -> list[tuple[int, dict[str, str], str | None]]:
    """(version, tags, run id) from ``version`` up to its root base, following ``parent_version`` tags."""
    chain: list[tuple[int, dict[str, str], str | None]] = []
    v: int | None = version
    c = reg.client
    while v is not None and all(v != seen for seen, _, _ in chain):
        mv = c.get_model_version(name, str(v))
        tags = dict(mv.tags)
        chain.append((v, tags, mv.run_id))
        parent = tags.get(PARENT_VERSION_TAG)
        v = int(parent) if parent and parent.isdigit() else None
    return chain


def lineage_requests(reg: Registry, name: str, version: int) -> list[EditRequest]:
    """Every fact ``version`` holds, from its root on: a later edit of the same (subject, prompt) wins."""
    held: dict[tuple[str, str], EditRequest] = {}
    for _, tags, run_id in reversed(ancestry(reg, name, version)):
        for r in own_requests(reg, tags, run_id):
            held[(r.subject, r.prompt)] = r
    return list(held.values())


def earlier_facts(
    held: Sequence[EditRequest], batch: Sequence[EditRequest], cap: int = RETENTION_CAP, seed: int = 0
) -> tuple[list[EditRequest], int]:
    """The held facts the new batch does not overwrite, at most ``cap`` of them (a seeded sample),
    and how many there were."""
    new = {(r.subject, r.prompt) for r in batch}
    earlier = [r for r in held if (r.subject, r.prompt) not in new]
    if len(earlier) <= cap:
        return earlier, len(earlier)
    return random.Random(seed).sample(earlier, cap), len(earlier)


# --------------------------------------------------------------------------- root references


def root_references(parent_tags: dict[str, str], parent_meta: dict, pre_metrics: dict[str, float]) -> dict[str, float]:
    """The root base's references: carried from the parent's ``editflow.json``, or (editing the root
    itself) its pre figures. A root perplexity measured on another drift slice than today's is dropped
    (the gate then checks perplexity against the parent only)."""
    legacy = {m: parent_tags[t] for m, t in LEGACY_ROOT_REFERENCE_TAGS.items() if t in parent_tags}
    carried = parent_meta.get(ROOT_REFERENCES_KEY) or legacy
    same_slice = float(carried.get(DRIFT_SLICE_KEY, 1)) == DRIFT_SLICE
    out: dict[str, float] = {}
    for metric in ROOT_REFERENCE_METRICS:
        if is_edit(parent_tags) and metric in carried and (same_slice or metric != "drift_ppl"):
            out[metric] = float(carried[metric])
        elif not is_edit(parent_tags) and f"pre/{metric}" in pre_metrics:
            out[metric] = float(pre_metrics[f"pre/{metric}"])
    if "drift_ppl" in out:
        out[DRIFT_SLICE_KEY] = float(DRIFT_SLICE)
    return out


__all__ = [
    "EditStateError",
    "ancestry",
    "earlier_facts",
    "lineage_requests",
    "log_facts",
    "log_state",
    "own_requests",
    "read_state",
    "root_references",
    "state_entry",
]
