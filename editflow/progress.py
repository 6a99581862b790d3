"""Progress on stderr for every step that can take more than a few seconds: one switch for editflow.

Usage::

    with progress.bar(total=len(rows), desc="score", unit="prompt") as bar:
        for part in parts:
            ...
            bar.update(len(part))

On a terminal the bars redraw in place (tqdm). Where stderr is not a terminal (``mlflow run``, CI,
a log file) each refresh is written as its own line, at most every ``LOG_INTERVAL`` seconds, so logs
stay readable. ``editflow --quiet`` (or ``EDITFLOW_QUIET=1``) turns all of it off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: Seconds between lines when stderr is not a terminal.
LOG_INTERVAL = 15.0

_quiet: bool | None = None


def set_quiet(quiet: bool | None) -> None:
    """Turn every progress bar and note off (``True``) or on (``False``) for this process; ``None``
    goes back to ``EDITFLOW_QUIET``."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    if _quiet is not None:
        return _quiet
    return os.environ.get("EDITFLOW_QUIET", "").strip().lower() in ("1", "true", "yes")


class _LineWriter:
    """A file for tqdm that turns carriage-return redraws into whole lines (for logs)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(total: float | None = None, desc: str = "", unit: str = "it", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (disabled when quiet)."""
    terminal = _is_terminal()
    kwargs.setdefault("mininterval", 0.5 if terminal else LOG_INTERVAL)
    kwargs.setdefault("dynamic_ncols", terminal)
    kwargs.setdefault("disable", is_quiet())
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        leave=terminal,
        file=sys.stderr if terminal else _LineWriter(sys.stderr),
        **kwargs,
    )


def track(
    iterable: Iterable[T], desc: str = "", total: float | None = None, unit: str = "it", **kwargs: Any
) -> Iterator[T]:
    """Iterate with a progress bar (see :func:`bar`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with bar(total=total, desc=desc, unit=unit, **kwargs) as b:
        for item in iterable:
            yield item
            b.update(1)


def note(message: str) -> None:
    """One plain line on stderr (a phase starting, a warning a user must see before waiting)."""
    if not is_quiet():
        print(message, file=sys.stderr, flush=True)
