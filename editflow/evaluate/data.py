"""Default evaluation material bundled with editflow: held-out text and held-out CounterFact facts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
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
