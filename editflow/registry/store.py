"""Where editflow keeps runs and models: ``sqlite:///mlflow.db`` with artifacts in ``./mlruns`` unless
``MLFLOW_TRACKING_URI`` says otherwise."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

EXPERIMENT = "editflow"
DEFAULT_MODEL_NAME = "editflow-default"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<cwd>/mlflow.db`` (see :func:`sqlalchemy_uri`)."""
    return sqlalchemy_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}")


def sqlalchemy_uri(uri: str) -> str:
    """``uri`` with a plain ``postgresql://`` mapped to psycopg 3 (``postgresql+psycopg://``) when it is
    installed (the ``postgres`` extra): SQLAlchemy's default for a plain URI is psycopg2. Any other URI,
    or one that names its driver, is returned as given."""
    if uri.startswith("postgresql://") and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + uri.removeprefix("postgresql://")
    return uri


def artifact_root() -> str:
    """Artifact location for new experiments: ``./mlruns`` beside a local store."""
    return (Path.cwd() / "mlruns").as_uri()


def is_sql(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in {"sqlite", "postgresql", "mysql", "mssql"}


def configure() -> str:
    """Point MLflow at editflow's store (idempotent); quiet MLflow's chatter. Returns the URI."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return uri


def ensure_experiment(name: str = EXPERIMENT) -> str:
    """The experiment id of ``name``, creating it with artifacts under ``./mlruns`` if needed."""
    import mlflow

    configure()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        location = artifact_root() if is_sql(tracking_uri()) else None
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def client():
    from mlflow import MlflowClient

    configure()
    return MlflowClient()


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Silence MLflow's deprecation warnings for stage APIs (kept in step for stage-based users)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        yield


def mask_uri(uri: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:****@host/db`` (also in longer text)."""
    return re.sub(r"(?<=[A-Za-z0-9+.-]://)([^/@:\s]*):([^/@\s]*)@", r"\1:****@", uri)
