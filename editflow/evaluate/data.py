"""Default evaluation material bundled with editflow: held-out text and held-out CounterFact facts."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from editflow.requests import EditRequest, parse_requests

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_HELDOUT_TEXT = ASSETS / "corpus" / "heldout.txt"
DEFAULT_COUNTERFACT = ASSETS / "counterfact" / "records.json"


def load_heldout_texts(path: str | os.PathLike | None = None) -> list[str]:
    """Non-empty lines of ``path`` (default: the bundled ``corpus/heldout.txt``; [] if it is absent)."""
    p = Path(path) if path is not None else DEFAULT_HELDOUT_TEXT
    if path is None and not p.is_file():
        return []
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def unrelated_texts(texts: Sequence[str], subjects: Iterable[str]) -> list[str]:
    """The ``texts`` that mention none of ``subjects`` (case-insensitive substring)."""
    needles = sorted({s.lower() for s in subjects if s.strip()})
    return [t for t, low in ((t, t.lower()) for t in texts) if not any(n in low for n in needles)]


def drift_texts(
    requests: Sequence[EditRequest], path: str | os.PathLike | None = None, facts_path: str | os.PathLike | None = None
) -> list[str]:
    """The held-out texts drift is measured on: those of ``path`` (default: the bundled held-out text)
    that mention no subject of ``requests`` nor of the bundled CounterFact records.

    A text that states a fact about an edited subject should become less likely after the edit: that
    is the edit, not drift (the bundled held-out text states the true facts of the bundled records,
    which the ``heldout`` known-fact figure measures). Leaving out the bundled subjects as well keeps
    the slice the same for every batch drawn from the bundled records, so a lineage's versions and its
    root are measured on the same text.
    """
    p = Path(facts_path) if facts_path is not None else DEFAULT_COUNTERFACT
    pool = [r.subject for r in parse_requests(json.loads(p.read_text(encoding="utf-8")))] if p.is_file() else []
    return unrelated_texts(load_heldout_texts(path), [*pool, *(r.subject for r in requests)])


def default_heldout_facts(
    requests: Sequence[EditRequest], n: int | None = None, path: str | os.PathLike | None = None
) -> list[EditRequest]:
    """The first ``n`` (default: all) bundled CounterFact records whose subject is not edited (``[]`` if
    absent): candidates, of which the :class:`~editflow.evaluate.Evaluator` keeps the known ones."""
    p = Path(path) if path is not None else DEFAULT_COUNTERFACT
    if not p.is_file():
        return []
    edited = {r.subject for r in requests}
    facts = [
        r
        for r in parse_requests(json.loads(p.read_text(encoding="utf-8")))
        if r.subject not in edited and r.target_true
    ]
    return facts[:n]
