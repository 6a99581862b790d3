"""The store-wide lock (a row in the ledger database): exclusion, take-over of abandoned rows, and
the timeout that names the holder."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import threading
import uuid

import pytest
from sqlalchemy.orm import Session

from editflow.registry import ledger, mutex
from editflow.registry.ledger import LockRow
from editflow.registry.store import Registry

#: Ledger databases on servers, by the variable that names each (CI starts both).
SERVERS = {"postgresql": "EDITFLOW_TEST_POSTGRES_URI", "mysql": "EDITFLOW_TEST_MYSQL_URI"}


@pytest.fixture(params=["sqlite", *SERVERS])
def reg(request, tmp_path):
    """A ledger on sqlite, and on PostgreSQL and MySQL when their variables name servers."""
    if request.param == "sqlite":
        yield Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", ledger_uri=f"sqlite:///{tmp_path / 'ledger.db'}")
        return
    uri = os.environ.get(SERVERS[request.param])
    if not uri:
        pytest.skip(f"{SERVERS[request.param]} not set")
    yield Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", ledger_uri=uri)


@pytest.fixture()
def x() -> str:
    """A lock name no other test (or test process sharing the database) uses."""
    return f"test-{uuid.uuid4().hex}"


def plant(reg: Registry, name: str, owner: str, age_s: float) -> None:
    """A row as another process would have left it."""
    acquired = ledger.now() - dt.timedelta(seconds=age_s)
    with Session(ledger.engine(reg)) as s, s.begin():
        s.add(LockRow(name=name, owner=owner, token="planted", acquired=acquired))


def holders(reg: Registry, name: str) -> list[str]:
    with Session(ledger.engine(reg)) as s:
        return [r.owner for r in s.query(LockRow).filter(LockRow.name == name)]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_excludes_others_until_released(reg, x):
    entered, release, order = threading.Event(), threading.Event(), []

    def first():
        with mutex.held(reg, x):
            order.append("first in")
            entered.set()
            release.wait(10)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    entered.wait(10)
    with pytest.raises(mutex.LockTimeout, match=r"the lock 'test-\w+' is held by .*:\d+:"):
        with mutex.held(reg, x, timeout_s=0.3):
            pass
    with mutex.held(reg, x + "-other", timeout_s=0.3):  # another name is free
        order.append("y")
    release.set()
    with mutex.held(reg, x, timeout_s=10):
        order.append("second in")
    t.join()
    assert order == ["first in", "y", "first out", "second in"]
    assert holders(reg, x) == []  # released


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(reg, x):
    plant(reg, x, f"{socket.gethostname()}:{dead_pid()}:", age_s=0)
    with mutex.held(reg, x, timeout_s=2):
        assert holders(reg, x) != [] and "planted" not in holders(reg, x)
    assert holders(reg, x) == []


def test_a_lock_from_another_host_waits_until_it_is_stale(reg, x):
    plant(reg, x, "otherhost:4242:99", age_s=10)
    with pytest.raises(mutex.LockTimeout, match="otherhost:4242:99 since"):
        with mutex.held(reg, x, timeout_s=0.3, stale_s=60):
            pass
    assert holders(reg, x) == ["otherhost:4242:99"]  # a live-looking holder is left alone
    with mutex.held(reg, x, timeout_s=2, stale_s=5):  # older than stale_s: taken over
        assert holders(reg, x) != ["otherhost:4242:99"]
    assert holders(reg, x) == []


def test_a_failing_block_releases_the_lock(reg, x):
    with pytest.raises(RuntimeError, match="boom"):
        with mutex.held(reg, x):
            raise RuntimeError("boom")
    assert holders(reg, x) == []
