"""Where editflow keeps runs and models: ``sqlite:///mlflow.db`` with artifacts in ``./mlruns`` unless
``MLFLOW_TRACKING_URI`` says otherwise; :class:`Registry`, the one client object for that store."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXPERIMENT = "editflow"
DEFAULT_MODEL_NAME = "editflow-default"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<cwd>/mlflow.db`` (see :func:`sqlalchemy_uri`)."""
    return sqlalchemy_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}")


#: Plain database URI schemes and the pure-Python driver editflow's extras install for them
#: (SQLAlchemy's defaults, psycopg2 and mysqlclient, are C builds nothing declares).
PLAIN_SQL_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql"}


def sqlalchemy_uri(uri: str) -> str:
    """``uri`` with a plain ``postgresql://`` mapped to psycopg 3 (``postgresql+psycopg://``, the
    ``postgres`` extra) and a plain ``mysql://`` to PyMySQL (``mysql+pymysql://``, the ``mysql`` extra)
    when that driver is installed. Any other URI, or one that names its driver, is returned as given."""
    scheme, sep, rest = uri.partition("://")
    driver = PLAIN_SQL_DRIVERS.get(scheme)
    if sep and driver and importlib.util.find_spec(driver) is not None:
        return f"{scheme}+{driver}://{rest}"
    return uri


def artifact_root() -> str:
    """Artifact location for new experiments: ``./mlruns`` beside a local store."""
    return (Path.cwd() / "mlruns").as_uri()


def is_sql(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in {"sqlite", "postgresql", "mysql", "mssql"}


class Registry:
    """editflow's store as one client object, as ``MlflowClient(tracking_uri, registry_uri)`` is:
    the tracking and registry URIs, an ``MlflowClient`` for them and the audit ledger's location.

    Build one per command or job and pass it down. ``None`` takes the default: the tracking URI from
    :func:`default_tracking_uri`, the registry in the tracking store, the ledger from
    ``EDITFLOW_LEDGER_URI`` or beside the tracking store (see
    :func:`editflow.registry.ledger.ledger_location`). The client and the ledger's engine are created
    on first use, so building a registry opens no database.

    Runs, logging and model registration go through MLflow's fluent API (``mlflow.start_run``,
    ``mlflow.log_*``, ``mlflow.register_model``, ``Model.log``), which takes no client: building a
    registry points that API at the same URIs, once, and quiets MLflow's loggers. Nothing sets them
    again per call, so a job's runs go to the registry built for the job.
    """

    def __init__(
        self, tracking_uri: str | None = None, registry_uri: str | None = None, ledger_uri: str | None = None
    ) -> None:
        import mlflow

        self.tracking_uri = sqlalchemy_uri(tracking_uri) if tracking_uri else default_tracking_uri()
        self.registry_uri = sqlalchemy_uri(registry_uri) if registry_uri else self.tracking_uri
        self.artifact_root = artifact_root()
        self._ledger_uri = ledger_uri or os.environ.get("EDITFLOW_LEDGER_URI") or None
        self._cwd = Path.cwd()
        self._client: Any = None
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri)
        for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def __repr__(self) -> str:
        return f"Registry({mask_uri(self.tracking_uri)!r})"

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` of this registry's URIs."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri, self.registry_uri)
        return self._client

    @property
    def ledger_uri(self) -> str:
        """Where the audit ledger lives; :class:`~editflow.registry.ledger.LedgerLocationError` for a
        tracking server when no ledger database was named."""
        from editflow.registry.ledger import ledger_location

        return self._ledger_uri or ledger_location(self.tracking_uri, self._cwd)

    def ensure_experiment(self, name: str = EXPERIMENT) -> str:
        """The experiment id of ``name``, creating it with artifacts under ``./mlruns`` if needed."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            location = self.artifact_root if is_sql(self.tracking_uri) else None
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def download(self, artifact_uri: str, dst: str | None = None) -> str:
        """A local path with the artifacts at ``artifact_uri`` (``runs:/``, ``models:/`` or a store URI)."""
        import mlflow

        return mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=dst, tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
        )

    def read_text(self, artifact_uri: str) -> str:
        """The text of one artifact of this store."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="editflow-text-") as tmp:
            return Path(self.download(artifact_uri, tmp)).read_text(encoding="utf-8")


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
