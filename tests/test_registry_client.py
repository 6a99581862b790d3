"""The registry as one client object: :class:`~editflow.registry.store.Registry` holds its URIs, opens
nothing until used, writes no environment variable, and only MLflow's not-found answer reads as
"none" (a store that cannot be read raises). The tag schema's names are pinned."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from conftest import tiny_model

from editflow.registry import schema
from editflow.registry.store import Registry
from editflow.registry.versions import aliases_of, resolve_version, versions_of


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("EDITFLOW_LEDGER_URI", raising=False)
    return tmp_path


def test_uris_come_from_the_environment_or_the_arguments(store, monkeypatch):
    import mlflow

    env = dict(os.environ)
    reg = Registry()
    assert reg.tracking_uri == reg.registry_uri == f"sqlite:///{store / 'mlflow.db'}"
    assert reg.ledger_uri == reg.tracking_uri and reg.artifact_root == (store / "mlruns").as_uri()
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == reg.tracking_uri  # the fluent API follows
    assert not (store / "mlflow.db").exists()  # nothing opened until used
    # MLflow's fluent setters export the URIs for subprocesses (as MLflow does); nothing else changes
    changed = {k for k in {*env, *os.environ} if env.get(k) != os.environ.get(k)}
    assert changed <= {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"}
    assert (os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_REGISTRY_URI"]) == (reg.tracking_uri,) * 2
    other = Registry(f"sqlite:///{store / 'b.db'}", ledger_uri=f"sqlite:///{store / 'ledger.db'}")
    assert (other.tracking_uri, other.registry_uri) == (f"sqlite:///{store / 'b.db'}",) * 2
    assert other.ledger_uri == f"sqlite:///{store / 'ledger.db'}" and reg.tracking_uri != other.tracking_uri
    monkeypatch.setenv("EDITFLOW_LEDGER_URI", "sqlite:////srv/ledger.db")
    assert Registry().ledger_uri == "sqlite:////srv/ledger.db"


def test_not_registered_reads_as_none(store):
    reg = Registry()
    assert versions_of(reg, "nosuch") == [] and aliases_of(reg, "nosuch") == {}
    with pytest.raises(LookupError, match="no version with alias 'production'"):
        resolve_version(reg, "nosuch", "@production")
    reg.client.create_registered_model("empty")
    assert versions_of(reg, "empty") == [] and aliases_of(reg, "empty") == {}
    with pytest.raises(LookupError, match="no version with alias 'production'"):
        resolve_version(reg, "empty", "@production")


def test_a_store_that_cannot_be_read_raises(store):
    (store / "mlflow.db").write_bytes(b"not a database" * 100)
    reg = Registry()
    for read in (versions_of, aliases_of):
        with pytest.raises(Exception, match="(?i)not a database"):
            read(reg, "tiny")
    with pytest.raises(Exception, match="(?i)not a database") as err:
        resolve_version(reg, "tiny", "@production")
    assert not isinstance(err.value, LookupError)


@pytest.mark.slow  # MLflow waits for the lock before it gives up
def test_a_locked_store_raises(store):
    reg = Registry()
    assert versions_of(reg, "tiny") == []  # creates the store
    holder = sqlite3.connect(store / "mlflow.db", timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        other = Registry()  # a fresh client: a new connection that meets the lock
        with pytest.raises(Exception, match="(?i)locked"):
            aliases_of(other, "tiny")
    finally:
        holder.rollback()
        holder.close()


def test_resolving_a_local_model_leaves_the_environment_alone(store, monkeypatch):
    from editflow.registry.resolve import resolve_base

    model, tok = tiny_model("gpt2")
    model.save_pretrained(store / "m")
    tok.save_pretrained(store / "m")
    for offline in ("1", None):
        if offline is None:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        reg = Registry()
        env = dict(os.environ)
        base = resolve_base(reg, str(store / "m"), device="cpu")
        assert base.version is None and Path(base.uri) == (store / "m").resolve()
        assert dict(os.environ) == env


def test_the_tag_schema_names_are_stable():
    """Versions already in stores carry these names: renaming one is a migration, not a refactor."""
    assert {k: v for k, v in vars(schema).items() if k.endswith("_TAG")} == {
        "ROLE_TAG": "editflow.role",
        "FINGERPRINT_TAG": "editflow.fingerprint",
        "SOURCE_TAG": "editflow.source",
        "STORAGE_TAG": "editflow.storage",
        "N_FACTS_TAG": "editflow.n_facts",
        "PARENT_VERSION_TAG": "editflow.parent_version",
        "BASE_VERSION_TAG": "editflow.base_version",
        "GATE_TAG": "editflow.gate",
        "TUNED_TAG": "editflow.tuned",
        "PENDING_TAG": "editflow.pending",
        "REGISTRAR_TAG": "editflow.registrar",
        "DIGEST_TAG": "editflow.weights_sha256",
        "LEGACY_EDIT_STATE_SHA256_TAG": "editflow.edit_state.sha256",
        "GGUF_SHA256_TAG": "editflow.gguf.sha256",
        "INTENT_TAG": "editflow.promotion_intent",
        "OWNER_TAG": "editflow.owner",
        "ERROR_TAG": "editflow.error",
        "PROMOTION_ERROR_TAG": "editflow.promotion_error",
        "PROMOTED_TAG": "editflow.promoted",
        "TUNE_MODEL_TAG": "editflow.tune.model",
        "TUNE_VERSION_TAG": "editflow.tune.version",
        "TUNE_BEST_TRIAL_TAG": "editflow.tune.best_trial",
        "TUNE_STOPPED_TAG": "editflow.tune.stopped",
        "TUNE_MESSAGE_TAG": "editflow.tune.message",
    }
    assert schema.LEGACY_ROOT_REFERENCE_TAGS == {
        "drift_ppl": "editflow.root.drift_ppl",
        "heldout": "editflow.root.heldout",
    }
    assert schema.metric_tag("efficacy") == "editflow.metric.efficacy"
    assert schema.stats_tag("0123456789abcdef" * 4) == "editflow.stats." + "0123456789abcdef" * 2
    assert schema.prefixed({"gguf.sha256": "x"}) == {schema.GGUF_SHA256_TAG: "x"}
