"""``editflow ledger migrate``: an existing ledger (e.g. the per-folder ``editflow-ledger.db`` an older
editflow wrote beside a remote tracking server) brought into the store's own, exactly and once."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner

from editflow.cli import main as cli
from editflow.registry import ledger
from editflow.registry.store import Registry
from editflow.requests import EditRequest

FACTS = [
    EditRequest(prompt="{} plays", subject="Ann", target_new="chess", target_true="tennis"),
    EditRequest(prompt="{} lives in", subject="Bo", target_new="Oslo", target_true="Rome"),
]


@pytest.fixture()
def ledgers(tmp_path, monkeypatch):
    """A source ledger file with two models' history, and a store whose ledger is its own database."""
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("EDITFLOW_ACTOR", "old-client")
    source = tmp_path / "old" / "editflow-ledger.db"
    source.parent.mkdir()
    old = Registry(tracking_uri=store, ledger_uri=f"sqlite:///{source}")
    for name in ("alpha", "beta"):
        ledger.record_event(old, name, "register", 1, reason="base model")
        ledger.record_event(old, name, "promote", 1, reason="first base version")
        ledger.record_facts(old, name, 2, FACTS, "d" * 64, "run2")
        ledger.record_event(old, name, "register", 2, parent_version=1, run_id="run2")
        ledger.record_event(old, name, "promote", 2, previous_version=1)
    return source, old, Registry(tracking_uri=store)


def test_migrate_copies_facts_and_history_exactly_once(ledgers):
    source, old, new = ledgers
    first = CliRunner().invoke(cli, ["ledger", "migrate", str(source), "--json"])
    assert first.exit_code == 0, first.output
    assert {k: v for k, v in json.loads(first.output).items() if k != "source"} == {
        "facts": 4,
        "events": 8,
        "skipped": 0,
    }
    for name in ("alpha", "beta"):
        assert ledger.held_facts(new, name, 2) == ledger.held_facts(old, name, 2)
        assert ledger.production_history(new, name) == [1, 2]
        assert [(e.action, e.version, e.actor) for e in ledger.events(new, name)] == [
            (e.action, e.version, e.actor) for e in ledger.events(old, name)
        ]
    again = CliRunner().invoke(cli, ["ledger", "migrate", str(source)])
    assert (
        again.exit_code == 0 and "copied 0 facts and 0 events" in again.output and "(12 already there)" in again.output
    )


def test_migrate_one_model(ledgers):
    source, _old, new = ledgers
    out = CliRunner().invoke(cli, ["ledger", "migrate", str(source), "--model", "beta", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["facts"] == 2
    assert ledger.production_history(new, "beta") == [1, 2] and ledger.production_history(new, "alpha") == []


def test_migrate_refuses_what_is_not_a_ledger(ledgers, tmp_path):
    missing = CliRunner().invoke(cli, ["ledger", "migrate", str(tmp_path / "nope.db")])
    assert missing.exit_code == 1 and missing.output.startswith("error: no such file or directory:")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("create table t (x int)").connection.commit()
    refused = CliRunner().invoke(cli, ["ledger", "migrate", str(other)])
    assert refused.exit_code == 1 and "holds no editflow ledger" in refused.output
    assert "Traceback" not in missing.output + refused.output
