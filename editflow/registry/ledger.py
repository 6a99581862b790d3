"""The audit ledger: which facts each version holds, and every registration, promotion and rollback.

Tables live beside MLflow's in the same database when the tracking store is SQL, else in a local
sqlite file (``EDITFLOW_LEDGER_URI`` overrides both).
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Integer, String, Text, create_engine, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from editflow.registry.store import Registry, is_sql, mask_uri, sqlalchemy_uri
from editflow.requests import EditRequest


class Base(DeclarativeBase):
    pass


class FactRow(Base):
    """One fact edited into one version (the version's own edits, not inherited ones)."""

    __tablename__ = "editflow_facts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(256), index=True)
    version: Mapped[int] = mapped_column(Integer, index=True)
    subject: Mapped[str] = mapped_column(Text, index=True)
    prompt: Mapped[str] = mapped_column(Text)
    target_new: Mapped[str] = mapped_column(Text)
    target_true: Mapped[str | None] = mapped_column(Text, nullable=True)
    requests_digest: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class EventRow(Base):
    """A registry event: ``register``, ``promote``, ``rollback`` or ``void`` (a production version
    whose registration was incomplete, deleted by repair: it leaves the production history)."""

    __tablename__ = "editflow_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(256), index=True)
    action: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    previous_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text, default="")
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class LockRow(Base):
    """A held lock (:mod:`editflow.registry.mutex`): one row per lock name while someone holds it."""

    __tablename__ = "editflow_locks"
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    owner: Mapped[str] = mapped_column(String(256))  # host:pid:start (editflow.registry.integrity.owner)
    token: Mapped[str] = mapped_column(String(64))  # this acquisition (a holder releases only its own)
    acquired: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class LedgerLocationError(LookupError):
    """The tracking store keeps no tables editflow can reach and no ledger database was named."""


def ledger_location(tracking_uri: str, cwd: Path) -> str:
    """Where the ledger of a tracking store lives when none is named: in the store's own database when it
    is SQL, else ``editflow-ledger.db`` in ``cwd``. A remote tracking server (http, https, databricks)
    has no SQL tables editflow can reach: the ledger must then be named (``EDITFLOW_LEDGER_URI``, the
    team's SQL database); it never falls back to a local file there, which every client folder would
    grow a different copy of."""
    if is_sql(tracking_uri):
        return tracking_uri
    if tracking_uri.split(":", 1)[0].lower() in ("http", "https", "databricks"):
        raise LedgerLocationError(
            f"the tracking server {mask_uri(tracking_uri)} keeps no ledger editflow can reach: set "
            "EDITFLOW_LEDGER_URI to the SQL database the team shares (e.g. postgresql://user@host/editflow)"
        )
    return f"sqlite:///{cwd / 'editflow-ledger.db'}"


@lru_cache(maxsize=8)
def _engine_for(uri: str) -> Engine:
    kwargs = {"connect_args": {"timeout": 60}} if uri.startswith("sqlite") else {}
    engine = create_engine(sqlalchemy_uri(uri), **kwargs)
    _create_tables(engine)
    return engine


def _create_tables(engine: Engine, attempts: int = 5) -> None:
    """Create the ledger's tables if absent. Clients starting at once on a new database race to
    create them (PostgreSQL then refuses the loser's duplicate type or table): try again, and the
    check finds them made."""
    for attempt in range(attempts):
        try:
            Base.metadata.create_all(engine, checkfirst=True)
            return
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def engine(reg: Registry) -> Engine:
    """The ledger database of ``reg`` (tables created on first use)."""
    return _engine_for(reg.ledger_uri)


def actor() -> str:
    return os.environ.get("EDITFLOW_ACTOR") or getpass.getuser()


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def record_facts(
    reg: Registry, model_name: str, version: int, requests: Sequence[EditRequest], digest: str, run_id: str | None
) -> None:
    with Session(engine(reg)) as s, s.begin():
        s.add_all(
            FactRow(
                model_name=model_name,
                version=version,
                subject=r.subject,
                prompt=r.prompt,
                target_new=r.target_new,
                target_true=r.target_true,
                requests_digest=digest,
                run_id=run_id,
            )
            for r in requests
        )


def record_event(
    reg: Registry,
    model_name: str,
    action: str,
    version: int,
    *,
    previous_version: int | None = None,
    parent_version: int | None = None,
    reason: str = "",
    run_id: str | None = None,
) -> None:
    with Session(engine(reg)) as s, s.begin():
        s.add(
            EventRow(
                model_name=model_name,
                action=action,
                version=version,
                previous_version=previous_version,
                parent_version=parent_version,
                actor=actor(),
                reason=reason,
                run_id=run_id,
                time=now(),
            )
        )


def last_event_id(reg: Registry, model_name: str) -> int:
    """The id of ``model_name``'s latest event (0 when none): events after it are newer."""
    with Session(engine(reg)) as s:
        row = s.scalars(
            select(EventRow.id).where(EventRow.model_name == model_name).order_by(EventRow.id.desc())
        ).first()
        return int(row or 0)


def has_event(
    reg: Registry, model_name: str, action: str, version: int, previous_version: int | None, after_id: int
) -> bool:
    """Whether an ``action`` event of ``version`` (from ``previous_version``) was recorded after event ``after_id``."""
    with Session(engine(reg)) as s:
        rows = s.scalars(
            select(EventRow).where(
                EventRow.model_name == model_name,
                EventRow.id > after_id,
                EventRow.action == action,
                EventRow.version == version,
            )
        )
        return any(r.previous_version == previous_version for r in rows)


def delete_version(reg: Registry, model_name: str, version: int) -> None:
    """Forget a version that failed to register completely."""
    with Session(engine(reg)) as s, s.begin():
        for row in s.scalars(select(FactRow).where(FactRow.model_name == model_name, FactRow.version == version)):
            s.delete(row)
        for row in s.scalars(
            select(EventRow).where(
                EventRow.model_name == model_name, EventRow.version == version, EventRow.action == "register"
            )
        ):
            s.delete(row)


@dataclass(frozen=True)
class Fact:
    version: int
    subject: str
    prompt: str
    target_new: str
    target_true: str | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.prompt)


def _fact(row: FactRow) -> Fact:
    return Fact(row.version, row.subject, row.prompt, row.target_new, row.target_true)


def own_facts(reg: Registry, model_name: str, version: int) -> list[Fact]:
    with Session(engine(reg)) as s:
        rows = s.scalars(
            select(FactRow).where(FactRow.model_name == model_name, FactRow.version == version).order_by(FactRow.id)
        )
        return [_fact(r) for r in rows]


def parent_of(reg: Registry, model_name: str, version: int) -> int | None:
    with Session(engine(reg)) as s:
        row = s.scalars(
            select(EventRow).where(
                EventRow.model_name == model_name, EventRow.version == version, EventRow.action == "register"
            )
        ).first()
        return row.parent_version if row else None


def held_facts(reg: Registry, model_name: str, version: int) -> dict[tuple[str, str], Fact]:
    """Facts a version holds: its own edits over those of its ancestors (latest edit wins)."""
    chain: list[int] = []
    v: int | None = version
    while v is not None and v not in chain:
        chain.append(v)
        v = parent_of(reg, model_name, v)
    held: dict[tuple[str, str], Fact] = {}
    for v in reversed(chain):
        for f in own_facts(reg, model_name, v):
            held[f.key] = f
    return held


def facts_for_subject(reg: Registry, model_name: str, subject: str) -> list[Fact]:
    """Every edit of ``subject`` (case-insensitive substring match), oldest first."""
    with Session(engine(reg)) as s:
        rows = s.scalars(
            select(FactRow)
            .where(FactRow.model_name == model_name, FactRow.subject.ilike(f"%{subject}%"))
            .order_by(FactRow.id)
        )
        return [_fact(r) for r in rows]


def events(reg: Registry, model_name: str) -> list[EventRow]:
    with Session(engine(reg)) as s:
        rows = list(s.scalars(select(EventRow).where(EventRow.model_name == model_name).order_by(EventRow.id)))
        s.expunge_all()
        return rows


def production_history(reg: Registry, model_name: str) -> list[int]:
    """Production versions as a stack: a promotion pushes (unless it is already on top), a rollback pops
    back to its target, a ``void`` removes the version everywhere."""
    stack: list[int] = []
    for e in events(reg, model_name):
        if e.action == "void":
            kept = [v for v in stack if v != e.version]
            stack = [v for i, v in enumerate(kept) if i == 0 or kept[i - 1] != v]
        elif stack and stack[-1] == e.version:
            continue
        elif e.action == "promote":
            stack.append(e.version)
        elif e.action == "rollback":
            if e.version in stack:
                del stack[stack.index(e.version) + 1 :]
            else:
                stack.append(e.version)
    return stack


def previous_production(reg: Registry, model_name: str, current: int | None) -> int | None:
    """The version that was production before ``current`` (what a plain rollback returns to)."""
    stack = production_history(reg, model_name)
    if stack and stack[-1] == current and len(stack) > 1:
        return stack[-2]
    return None


# --------------------------------------------------------------------------- migration


@dataclass(frozen=True)
class MigrationReport:
    facts: int  # rows copied
    events: int
    skipped: int  # rows the destination already held


def _fact_key(r: FactRow) -> tuple:
    return (r.model_name, r.version, r.subject, r.prompt, r.target_new, r.target_true, r.requests_digest, r.run_id)


def _event_key(r: EventRow) -> tuple:
    stamp = r.time.replace(tzinfo=None) if r.time is not None else None  # sqlite drops the zone
    return (r.model_name, r.action, r.version, r.previous_version, r.parent_version, r.actor, r.reason, r.run_id, stamp)


def migrate(source_uri: str, reg: Registry, model_name: str | None = None) -> MigrationReport:
    """Copy the facts and events of the ledger at ``source_uri`` (e.g. a per-folder
    ``editflow-ledger.db`` an older editflow wrote beside a remote tracking server) into ``reg``'s
    ledger, in their original order, for every model or only ``model_name``. Rows the destination
    already holds are skipped, so running it again copies nothing; one transaction, so a failure
    copies nothing."""
    if sqlalchemy_uri(source_uri) == sqlalchemy_uri(reg.ledger_uri):
        raise ValueError("the source ledger is the destination ledger")
    src = create_engine(sqlalchemy_uri(source_uri))
    tables = set(inspect(src).get_table_names())
    if not {FactRow.__tablename__, EventRow.__tablename__} <= tables:
        raise ValueError(f"{mask_uri(source_uri)} holds no editflow ledger (tables editflow_facts, editflow_events)")
    with Session(src) as s:
        facts, events = (
            list(s.scalars(select(row).where(row.model_name == model_name if model_name else True).order_by(row.id)))
            for row in (FactRow, EventRow)
        )
        s.expunge_all()
    with Session(engine(reg)) as d, d.begin():
        copied_facts, skipped_facts = _copy_new(d, facts, FactRow, _fact_key)
        copied_events, skipped_events = _copy_new(d, events, EventRow, _event_key)
    return MigrationReport(copied_facts, copied_events, skipped_facts + skipped_events)


def _copy_new(d: Session, rows: Sequence[Base], row_type: type[Base], key: Callable[[Any], tuple]) -> tuple[int, int]:
    """Add to ``d`` the ``rows`` whose ``key`` the destination does not hold yet: (copied, skipped)."""
    have = {key(r) for r in d.scalars(select(row_type))}
    new = [r for r in rows if key(r) not in have]
    d.add_all(row_type(**{c: getattr(r, c) for c in _columns(row_type)}) for r in new)
    return len(new), len(rows) - len(new)


def _columns(row: type[Base]) -> list[str]:
    """The columns of a row type, without its surrogate id (the destination numbers rows itself)."""
    return [c.name for c in row.__table__.columns if c.name != "id"]
