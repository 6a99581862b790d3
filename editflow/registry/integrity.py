"""Registry integrity: weight digests, incomplete registrations, interrupted promotions, crash tests.

* **Weights.** Every model directory records the SHA-256 of its weights files in ``editflow.json``
  (``weights_sha256``: ``{"files": {relpath: sha}, "base": <base manifest digest>}``); the version
  carries the digest of that manifest as the tag ``editflow.weights_sha256``, so an altered
  ``editflow.json`` is caught as well as an altered weights file. A delta's manifest names its base's
  manifest digest, so one verified tag covers the whole lineage.
* **Registration** is a transaction: a version is registered with ``editflow.pending`` set (atomically
  with the version) and the tag is cleared last, after the weights, tags and ledger entry exist.
  Readers skip or refuse pending versions; :func:`repair` deletes those left by a dead process,
  with their model files.
* **Promotion** writes an intent (registered-model tag ``editflow.promotion_intent``) before moving
  the alias; :func:`repair` (and the next promotion) finishes or reverts an intent left behind.
* **Crash tests.** :func:`crashpoint` kills the process at a named step when ``EDITFLOW_CRASH_AT``
  names it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editflow import hashing
from editflow.registry.schema import (
    BASE_ARTIFACT_URI_KEY,
    BASE_MODEL_URI_KEY,
    BASE_VERSION_KEY,
    DIGEST_TAG,
    ERROR_TAG,
    INTENT_TAG,  # noqa: F401 - part of this module's interface (promotion intents)
    OWNER_TAG,
    PENDING_TAG,
    REGISTRAR_TAG,
    STORAGE_KEY,
)
from editflow.registry.schema import WEIGHTS_SHA256_KEY as META_KEY
from editflow.registry.store import EXPERIMENT, Registry, quiet_deprecations

CRASH_ENV = "EDITFLOW_CRASH_AT"
#: Seconds after which a pending version or promotion intent of an unknown (other host's) process
#: counts as abandoned; a live registration or promotion takes seconds.
GRACE_S = 600.0
#: Seconds after which a RUNNING edit run whose process cannot be checked counts as orphaned (edit
#: runs of large models can take hours).
RUN_GRACE_S = 24 * 3600.0
#: Suffixes of the files whose digests are recorded.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".index.json")


class WeightsIntegrityError(ValueError):
    """A weights file (or the recorded digests) does not match what the version recorded."""


class IncompleteVersionError(LookupError):
    """A version whose registration has not finished (or was interrupted)."""


# --------------------------------------------------------------------------- crash tests


def crashpoint(name: str) -> None:
    """Kill this process with SIGKILL when ``EDITFLOW_CRASH_AT`` (comma-separated) names ``name``."""
    if name in os.environ.get(CRASH_ENV, "").split(","):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- process identity


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks (Linux ``/proc``), ``None`` if unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def owner() -> str:
    """``host:pid:start`` of this process (what :func:`owner_alive` checks)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid()) or ''}"


def owner_alive(value: str | None) -> bool | None:
    """Whether the process named by an :func:`owner` string lives; ``None`` when it cannot be told
    (another host, or no value)."""
    if not value or value.count(":") < 2:
        return None
    host, pid_text, start = value.rsplit(":", 2)
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or _proc_start(int(pid_text)) in (None, start)


def claim_run() -> None:
    """Tag the active MLflow run with this process (:data:`OWNER_TAG`), so :func:`repair` can tell an
    orphaned run from a live one without waiting for :data:`RUN_GRACE_S`."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tag(OWNER_TAG, owner())


# --------------------------------------------------------------------------- digests

_digest_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, cached in-process per (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _digest_cache:
        _digest_cache[key] = hashing.file_sha256(p)
    return _digest_cache[key]


def weights_files(model_dir: str | os.PathLike, storage: str) -> list[str]:
    """Relative paths of the weights files of an editflow model directory."""
    root = Path(model_dir)
    if storage == "delta":
        return ["edited.safetensors"]
    return sorted(
        p.relative_to(root).as_posix()
        for p in (root / "weights").iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def make_manifest(model_dir: str | os.PathLike, storage: str, base: str | None = None) -> dict[str, Any]:
    """``{"files": {relpath: sha256}, "base": base}`` for a model directory just written."""
    files = {rel: file_sha256(Path(model_dir) / rel) for rel in weights_files(model_dir, storage)}
    return {"files": files, "base": base}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The compact digest of a manifest (the ``editflow.weights_sha256`` tag)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def verify_dir(model_dir: str | os.PathLike, meta: dict[str, Any], expected: str | None) -> dict[str, str]:
    """Check every weights file of ``model_dir`` against ``meta``'s manifest, and the manifest against
    ``expected`` (the version's tag) when given. Returns the checked files' digests; raises
    :class:`WeightsIntegrityError` naming the first bad file. A directory written before digests were
    recorded (no manifest, no tag) passes unchecked."""
    root = Path(model_dir)
    manifest = meta.get(META_KEY)
    if manifest is None:
        if expected:
            raise WeightsIntegrityError(
                f"{root / 'editflow.json'}: no recorded weight digests, but the version "
                f"has {DIGEST_TAG}={expected[:16]}… (editflow.json altered)"
            )
        return {}
    if expected and manifest_digest(manifest) != expected:
        raise WeightsIntegrityError(
            f"{root / 'editflow.json'}: recorded weight digests do not match the "
            f"version's {DIGEST_TAG} tag (editflow.json altered)"
        )
    listed = set(manifest.get("files", {}))
    extra = set(weights_files(root, meta.get(STORAGE_KEY, "full"))) - listed
    if extra:
        raise WeightsIntegrityError(f"{root / sorted(extra)[0]}: weights file not in the recorded digests")
    for rel, sha in sorted(manifest.get("files", {}).items()):
        _check_file(root / rel, sha)
    return dict(manifest.get("files", {}))


def _check_file(path: Path, sha: str) -> None:
    if not path.is_file():
        raise WeightsIntegrityError(f"{path}: weights file missing")
    actual = file_sha256(path)
    if actual != sha:
        raise WeightsIntegrityError(
            f"{path}: SHA-256 {actual[:16]}… does not match the recorded {sha[:16]}… "
            "(corrupt or altered weights; nothing was loaded from it)"
        )


# --------------------------------------------------------------------------- verification of versions


@dataclass
class Checked:
    """One verified model directory of a lineage."""

    version: int | None
    uri: str
    files: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


def verify_version(reg: Registry, name: str, version: int) -> list[Checked]:
    """Verify version ``version`` of ``name`` and, for a delta, its root base; raise
    :class:`WeightsIntegrityError` on the first mismatch. Returns what was checked."""
    c = reg.client
    mv = c.get_model_version(name, str(version))
    uri = c.get_model_version_download_uri(name, str(version))
    checked = [_verify_uri(reg, uri, mv.tags.get(DIGEST_TAG), version)]
    meta = checked[0].meta
    if meta.get(STORAGE_KEY) == "delta":
        base = meta.get(BASE_VERSION_KEY)
        checked.append(_verify_uri(reg, meta[BASE_ARTIFACT_URI_KEY], base_expected(reg, meta), base))
    return checked


def base_expected(reg: Registry, meta: dict[str, Any]) -> str | None:
    """The manifest digest a delta expects of its base: recorded in its own manifest, else the base
    version's tag (deltas registered before bases had digests recorded name none)."""
    from editflow.registry.versions import is_not_found

    recorded = (meta.get(META_KEY) or {}).get("base")
    if recorded:
        return recorded
    uri = meta.get(BASE_MODEL_URI_KEY) or ""
    if not uri.startswith("models:/"):
        return None
    try:
        name, version = uri[len("models:/") :].rsplit("/", 1)
        return reg.client.get_model_version(name, version).tags.get(DIGEST_TAG)
    except Exception as exc:
        if is_not_found(exc):  # a base that is gone is reported when it is loaded
            return None
        raise


def _verify_uri(reg: Registry, uri: str, expected: str | None, version: int | None) -> Checked:
    import tempfile

    from editflow.registry import flavor

    local = flavor.local_path(uri)
    if local is not None:
        meta = flavor.read_meta(local)
        return Checked(version, uri, verify_dir(local, meta, expected), meta)
    with tempfile.TemporaryDirectory(prefix="editflow-verify-") as tmp:
        local_dir = flavor.download(uri, tmp, reg)
        meta = flavor.read_meta(local_dir)
        return Checked(version, uri, verify_dir(local_dir, meta, expected), meta)


# --------------------------------------------------------------------------- pending versions


def is_pending(mv: Any) -> bool:
    """Whether a model version's registration has not finished."""
    return PENDING_TAG in (mv.tags or {})


def _age_s(ms: int | None) -> float:
    return time.time() - (ms or 0) / 1000


def _run_status(reg: Registry, run_id: str | None) -> str | None:
    from editflow.registry.versions import is_not_found

    if not run_id:
        return None
    try:
        return reg.client.get_run(run_id).info.status
    except Exception as exc:
        if is_not_found(exc):  # a deleted run cannot finish the registration
            return None
        raise


def abandoned(reg: Registry, mv: Any, grace_s: float = GRACE_S) -> bool:
    """A pending version nobody is finishing: its registering process (on this host) is dead; or,
    when that cannot be told, its run is no longer RUNNING or it is older than ``grace_s``. A live
    registering process (same pid and start time) is never interrupted."""
    if not is_pending(mv):
        return False
    alive = owner_alive(mv.tags.get(REGISTRAR_TAG))
    if alive is not None:
        return not alive
    return _age_s(mv.creation_timestamp) > grace_s or _run_status(reg, mv.run_id) != "RUNNING"


def discard_version(reg: Registry, name: str, version: int) -> list[str]:
    """Delete an incomplete version, its model files (:func:`discard_files`) and its ledger rows; if
    production pointed at it, production goes back to the previous production version (a ``void``
    ledger event records why). Returns what could not be deleted of its files (reported, not raised)."""
    from editflow.registry import ledger, promotion

    mv = reg.client.get_model_version(name, str(version))
    if version in ledger.production_history(reg, name):
        ledger.record_event(reg, name, "void", version, reason="repair: incomplete registration deleted")
    if promotion.production_version(reg, name) == version:
        promotion.restore_history_top(reg, name, exclude=version)
    problems, model_id = discard_files(reg, mv)  # files first: a kill after this leaves no orphan files
    with quiet_deprecations():
        reg.client.delete_model_version(name, str(version))
    ledger.delete_version(reg, name, version)
    if model_id:
        problems += _attempt(f"logged model {model_id}", lambda: reg.client.delete_logged_model(model_id))
    return problems


#: A version registered from a logged model (MLflow 3): ``models:/m-<id>``.
_LOGGED_MODEL = re.compile(r"models:/(m-[0-9A-Za-z]+)/?")


def model_files(reg: Registry, mv: Any) -> tuple[str | None, str | None]:
    """(artifact URI of a version's own model files, its logged model id). A ``models:/m-<id>`` source
    is a logged model; ``runs:/RUN/PATH`` and store URIs are run artifacts (older registrations). A
    source naming another registered version, or a whole run's artifacts, gives ``None``: those files
    are not the version's own."""
    source = mv.source or ""
    if m := _LOGGED_MODEL.fullmatch(source):
        return reg.client.get_logged_model(m.group(1)).artifact_location, m.group(1)
    if not source or source.startswith("models:/"):
        return None, None
    if source.startswith("runs:/"):
        from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

        source = RunsArtifactRepository.get_underlying_uri(source, reg.tracking_uri)
    run_root = reg.client.get_run(mv.run_id).info.artifact_uri if mv.run_id else None
    return (None if run_root and source.rstrip("/") == run_root.rstrip("/") else source), None


def discard_files(reg: Registry, mv: Any) -> tuple[list[str], str | None]:
    """Delete the model files of version ``mv`` (local files, S3, the server's proxied artifacts: any
    store MLflow deletes from), unless another version was registered from the same source. Returns
    (what could not be deleted, the logged model id to delete once the version is gone)."""
    try:
        uri, model_id = model_files(reg, mv)
    except Exception as exc:  # noqa: BLE001 - reported: the files stay, the version still goes
        return [f"files of {mv.source}: {type(exc).__name__}: {exc}"], None
    if uri is None or _shared(reg, mv):
        return [], None
    return _attempt(f"files at {uri}", lambda: _delete_artifacts(reg, uri)), model_id


def _delete_artifacts(reg: Registry, uri: str) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(uri, tracking_uri=reg.tracking_uri, registry_uri=reg.registry_uri).delete_artifacts()


def _shared(reg: Registry, mv: Any) -> bool:
    """Whether any other version (of any model) was registered from ``mv``'s source; ``True`` when the
    store cannot tell (files are only deleted when they are surely this version's alone)."""
    try:
        found = reg.client.search_model_versions(f"source_path = '{mv.source}'")
    except Exception:  # noqa: BLE001 - unknown: keep the files
        return True
    return any((v.name, str(v.version)) != (mv.name, str(mv.version)) for v in found)


def _attempt(what: str, fn: Any) -> list[str]:
    """``[]`` when ``fn()`` succeeds, else one line saying what could not be deleted and why."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return [f"{what}: {type(exc).__name__}: {exc}"[:500]]
    return []


# --------------------------------------------------------------------------- orphaned runs


def orphaned_runs(reg: Registry, run_grace_s: float = RUN_GRACE_S) -> list[Any]:
    """RUNNING editflow runs whose process is dead (this host), or, when that cannot be told, that
    started more than ``run_grace_s`` ago."""
    c = reg.client
    exps = [e.experiment_id for e in c.search_experiments()]
    if not exps:
        return []
    editflow_exp = {e.experiment_id for e in c.search_experiments() if e.name == EXPERIMENT}
    out = []
    for run in c.search_runs(exps, filter_string="attributes.status = 'RUNNING'", max_results=1000):
        alive = owner_alive(run.data.tags.get(OWNER_TAG))
        known = OWNER_TAG in run.data.tags or run.info.experiment_id in editflow_exp
        old = _age_s(run.info.start_time) > run_grace_s
        if alive is False or (alive is None and known and old):
            out.append(run)
    return out


def fail_run(reg: Registry, run_id: str, reason: str) -> None:
    """End a run FAILED with ``reason`` as its ``editflow.error`` tag."""
    c = reg.client
    c.set_tag(run_id, ERROR_TAG, reason[:4000])
    c.set_terminated(run_id, "FAILED")


# --------------------------------------------------------------------------- repair


@dataclass
class RepairReport:
    """What :func:`repair` did."""

    intents: list[str] = field(default_factory=list)
    deleted: list[tuple[str, int]] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)
    #: (name, version, what could not be deleted of a deleted version's files, and why)
    leftovers: list[tuple[str, int, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        return (
            [f"promotion intent: {i}" for i in self.intents]
            + [f"deleted incomplete version {n} {v}" for n, v in self.deleted]
            + [f"deleted version {n} {v}: could not delete {what}" for n, v, what in self.leftovers]
            + [f"marked orphaned run {r} FAILED" for r in self.failed_runs]
        )


def repair(
    reg: Registry, name: str | None = None, grace_s: float = GRACE_S, run_grace_s: float = RUN_GRACE_S
) -> RepairReport:
    """Finish or revert interrupted promotions, adopt a production alias moved outside editflow, delete
    abandoned pending versions (their files too) and end orphaned runs FAILED, for ``name`` (every
    registered model when ``None``). Live work is never touched: see :func:`abandoned`, :func:`orphaned_runs` and :func:`editflow.registry.promotion.resolve_intent`."""
    from editflow.registry import promotion

    report = RepairReport()
    names = [name] if name else [m.name for m in reg.client.search_registered_models()]
    for n in names:
        for outcome in (promotion.resolve_intent(reg, n, grace_s=grace_s), promotion.reconcile(reg, n)):
            if outcome:
                report.intents.append(f"{n}: {outcome}")
    for run in orphaned_runs(reg, run_grace_s):
        fail_run(reg, run.info.run_id, f"orphaned: the process running it died ({_stamp()}, editflow repair)")
        report.failed_runs.append(run.info.run_id)
    for n in names:
        for mv in _all_versions(reg, n):
            if abandoned(reg, mv, grace_s):
                problems = discard_version(reg, n, int(mv.version))
                report.deleted.append((n, int(mv.version)))
                report.leftovers += [(n, int(mv.version), p) for p in problems]
    return report


def _all_versions(reg: Registry, name: str) -> list[Any]:
    from editflow.registry.versions import versions_of

    return versions_of(reg, name, include_pending=True)


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
