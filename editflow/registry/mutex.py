"""Locks every client of one store shares, from any host: a row in the ledger database.

Base registrations and production moves must be serialised across every process that edits a model,
on one machine or many. A lock file serialises one host only; the ledger database (the tracking
store's own SQL database, or the team's ``EDITFLOW_LEDGER_URI``) is what all clients reach. Acquiring
inserts the lock's row, whose primary key is the lock's name, so a second insert fails until the
holder deletes it. A row left by a process that died on this host is taken over at once; one from
another host (whose process cannot be asked) once it is older than ``stale_s``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Iterator

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from editflow.registry import integrity, ledger
from editflow.registry.ledger import LockRow
from editflow.registry.store import Registry

#: How long to wait for a lock before giving up (a base upload of a large model can take minutes).
TIMEOUT_S = 1800.0
#: A lock held this long by a process on another host is presumed abandoned.
STALE_S = 3600.0


class LockTimeout(TimeoutError):
    """The lock stayed held by a live (or not yet stale) owner for the whole timeout."""


def _try_insert(engine, name: str, owner: str, token: str) -> bool:
    try:
        with Session(engine) as s, s.begin():
            s.add(LockRow(name=name, owner=owner, token=token, acquired=ledger.now()))
        return True
    except IntegrityError:
        return False


def _holder(engine, name: str) -> LockRow | None:
    with Session(engine) as s:
        return s.scalars(select(LockRow).where(LockRow.name == name)).first()


def abandoned(row: LockRow, stale_s: float, now: dt.datetime) -> bool:
    """Whether a held lock may be taken over: its owner is dead (this host) or it is older than
    ``stale_s`` (an owner that cannot be asked)."""
    alive = integrity.owner_alive(row.owner)
    if alive is not None:
        return not alive
    acquired = row.acquired if row.acquired.tzinfo else row.acquired.replace(tzinfo=dt.timezone.utc)
    return (now - acquired).total_seconds() > stale_s


def _take_over(engine, row: LockRow) -> None:
    """Delete an abandoned row, only if it is still that acquisition (two takers cannot both win)."""
    with Session(engine) as s, s.begin():
        s.execute(delete(LockRow).where(LockRow.name == row.name, LockRow.token == row.token))


@contextlib.contextmanager
def held(
    reg: Registry, name: str, timeout_s: float = TIMEOUT_S, stale_s: float = STALE_S, poll_s: float = 0.2
) -> Iterator[None]:
    """Hold the store-wide lock ``name`` for the block (not re-entrant)."""
    engine = ledger.engine(reg)
    owner, token = integrity.owner(), uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    while not _try_insert(engine, name, owner, token):
        row = _holder(engine, name)
        if row is not None and abandoned(row, stale_s, ledger.now()):
            _take_over(engine, row)
            continue
        if time.monotonic() > deadline:
            who = f"{row.owner} since {row.acquired:%Y-%m-%d %H:%M:%S}" if row else "another process"
            raise LockTimeout(f"the lock {name!r} is held by {who}; waited {timeout_s:.0f} s")
        time.sleep(poll_s)
    try:
        yield
    finally:
        with Session(engine) as s, s.begin():
            s.execute(delete(LockRow).where(LockRow.name == name, LockRow.token == token))
