"""Registered model versions: register bases and edits, resolve references, load, export, list.

A base model enters the registry once, in full. An edit version stores only the tensors that differ
from its root base (the rewrite weights edited anywhere in its lineage) and names its base and
parent versions in tags and in ``editflow.json``.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from editflow.models import ModelHandle, fingerprint
from editflow.registry import flavor, integrity, ledger
from editflow.registry.schema import (
    BASE_ARTIFACT_URI_KEY,
    BASE_VERSION_KEY,
    BASE_WEIGHTS_SHA256_KEY,
    DIGEST_TAG,
    EDITED_TENSORS_KEY,
    FINGERPRINT_TAG,
    GATE_TAG,
    GGUF_KEY,
    GGUF_SHA256_TAG,
    PENDING_TAG,
    REGISTRAR_TAG,
    ROLE_BASE,
    ROLE_TAG,
)
from editflow.registry.store import Registry, quiet_deprecations

T = TypeVar("T")


@dataclass
class VersionRef:
    """A loaded registered version (or a model not yet registered: ``version is None``)."""

    handle: ModelHandle
    name: str | None
    version: int | None
    uri: str
    fingerprint: str
    base_version: int | None = None
    base_artifact_uri: str | None = None
    edited_tensors: list[str] = field(default_factory=list)


#: Words in a store error that mean "try again": a busy database, or a concurrent writer that created
#: the same row first (e.g. two first edits creating the ``candidate`` alias at once: sqlite says
#: "UNIQUE constraint failed", PostgreSQL "duplicate key", MySQL "Duplicate entry"), or MLflow giving
#: up on its own version-number retries ("Model Version creation error").
TRANSIENT = (
    "locked",
    "busy",
    "unique constraint",
    "duplicate key",
    "duplicate entry",
    "integrityerror",
    "deadlock",
    "version creation error",
)
#: (name, version) pairs this context is registering: usable here before their pending tag is cleared
#: (e.g. a first base promoted inside its own registration).
_REGISTERING: ContextVar[frozenset[tuple[str, int]]] = ContextVar("editflow_registering", default=frozenset())


def retry(fn: Callable[[], T], attempts: int = 8, delay: float = 0.5) -> T:
    """Retry ``fn`` on transient store errors (see :data:`TRANSIENT`)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - re-raised unless transient
            text = f"{type(exc).__name__} {exc}".lower()
            transient = any(word in text for word in TRANSIENT)
            if not transient or i == attempts - 1:
                raise
            time.sleep(delay * (i + 1))
    raise AssertionError("unreachable")


def parse_models_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME/3`` or ``models:/NAME@alias`` -> (NAME, "3" | "@alias")."""
    m = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", uri)
    if not m:
        raise ValueError(f"not a registered-model URI: {uri!r} (use models:/NAME/VERSION or models:/NAME@ALIAS)")
    return m.group(1), (m.group(2) or "@" + m.group(3))


def resolve_version(reg: Registry, name: str, ref: str | int) -> int:
    """A version number from ``3``, ``"3"`` or ``"@production"``."""
    c = reg.client
    ref = str(ref)
    if ref.startswith("@"):
        try:
            mv = c.get_model_version_by_alias(name, ref[1:])
        except Exception as exc:
            if not (is_not_found(exc) or _is_invalid(exc)):  # no such model; no such (or no valid) alias
                raise
            raise LookupError(f"registered model {name!r} has no version with alias {ref[1:]!r}") from exc
        check_complete(name, mv)
        return int(mv.version)
    check_complete(name, c.get_model_version(name, ref))  # raises if absent or pending
    return int(ref)


def check_complete(name: str, mv: Any) -> None:
    """Raise :class:`~editflow.registry.integrity.IncompleteVersionError` for a pending version (one
    whose registration has not finished), unless this context is registering it."""
    if integrity.is_pending(mv) and (name, int(mv.version)) not in _REGISTERING.get():
        raise integrity.IncompleteVersionError(
            f"version {mv.version} of {name!r} is incomplete: its registration has not finished or was "
            f"interrupted (editflow verify {name} --repair deletes abandoned registrations)"
        )


@contextlib.contextmanager
def registering(name: str, version: int) -> Iterator[None]:
    """Within this block, version ``version`` of ``name`` is usable here although still pending."""
    token = _REGISTERING.set(_REGISTERING.get() | {(name, version)})
    try:
        yield
    finally:
        _REGISTERING.reset(token)


def tags_of(reg: Registry, name: str, version: int) -> dict[str, str]:
    return dict(reg.client.get_model_version(name, str(version)).tags)


def load_version(
    reg: Registry, name: str, ref: str | int, device: str | None = None, dtype: str | None = None
) -> VersionRef:
    """Load a registered version (full, or delta over its base), verifying every weights file against
    the version's recorded digests (:class:`~editflow.registry.integrity.WeightsIntegrityError`)."""
    version = resolve_version(reg, name, ref)
    c = reg.client
    uri = c.get_model_version_download_uri(name, str(version))
    expected = c.get_model_version(name, str(version)).tags.get(DIGEST_TAG)
    handle = flavor.load_model(uri, device=device, dtype=dtype, expected=expected, reg=reg)
    meta = handle.extra["editflow"]
    return VersionRef(
        handle=handle,
        name=name,
        version=version,
        uri=f"models:/{name}/{version}",
        fingerprint=fingerprint(handle.model),
        base_version=int(meta.get(BASE_VERSION_KEY) or version),
        base_artifact_uri=meta.get(BASE_ARTIFACT_URI_KEY) or uri,
        edited_tensors=list(meta.get(EDITED_TENSORS_KEY, [])),
    )


def registered_names(reg: Registry) -> list[str]:
    return [m.name for m in reg.client.search_registered_models()]


#: Registered-model names editflow accepts: what MLflow's search filters can quote safely (no quotes,
#: no URI separators, no control characters), up to 256 characters.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+-]{0,255}")


def check_model_name(name: str) -> str:
    """``name`` if editflow can register and search it, else ``ValueError`` saying which rule fails."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        shown = repr(name)[:80]
        raise ValueError(
            f"registered-model name {shown} is not allowed: use letters, digits, space, '.', '_', '+' and '-' "
            "(starting with a letter or digit, at most 256 characters)"
        )
    return name


def versions_of(reg: Registry, name: str, include_pending: bool = False) -> list[Any]:
    """The complete versions of ``name``, oldest first (empty when the model is not registered);
    ``include_pending`` adds those whose registration has not finished. A store that cannot be read
    raises: "no versions" is only ever the store's answer."""
    found = reg.client.search_model_versions(f"name='{check_model_name(name)}'")
    registering = _REGISTERING.get()
    kept = [v for v in found if include_pending or not integrity.is_pending(v) or (name, int(v.version)) in registering]
    return sorted(kept, key=lambda v: int(v.version))


def find_base(reg: Registry, name: str, fp: str) -> int | None:
    """The version of ``name`` registered as a base with this weight fingerprint, if any."""
    for v in versions_of(reg, name):
        if v.tags.get(ROLE_TAG) == ROLE_BASE and v.tags.get(FINGERPRINT_TAG) == fp:
            return int(v.version)
    return None


def log_and_register(
    reg: Registry,
    name: str,
    handle: ModelHandle,
    *,
    storage: str,
    edited_tensors: Sequence[str] = (),
    lineage: dict[str, Any],
    tags: dict[str, str],
    description: str,
    on_registered: Callable[[int], None] | None = None,
) -> int:
    """Log the model in the active run and register it as a new version of ``name``.

    The version is registered with the ``editflow.pending`` tag (set atomically with it) and its
    weights digest tag; the description and ``on_registered`` (alias, ledger) follow, and the pending
    tag is cleared last, so a version is usable only once everything is written. If a step fails the
    version is deleted again; if the process dies, :func:`editflow.registry.integrity.repair` deletes it.
    """
    import mlflow

    integrity.claim_run()
    info, digest = _log_model(reg, name, handle, storage, edited_tensors, lineage)
    pending = {PENDING_TAG: "1", REGISTRAR_TAG: integrity.owner(), DIGEST_TAG: digest}
    # the fluent API registers in the registry URI the Registry set (the run's store)
    mv = retry(lambda: mlflow.register_model(info.model_uri, name, tags={**tags, **pending}, await_registration_for=0))
    version = int(mv.version)
    integrity.crashpoint("after_register_model")
    try:
        _complete(reg, name, version, description, on_registered)
    except BaseException:
        _unregister(reg, name, version)
        raise
    return version


def _log_model(
    reg: Registry,
    name: str,
    handle: ModelHandle,
    storage: str,
    edited_tensors: Sequence[str],
    lineage: dict[str, Any],
) -> tuple[Any, str]:
    """Log the model in the active run; its model info and the digest of its weights manifest. A delta
    records its base's manifest digest, so its own digest covers the base too."""
    from mlflow.models import Model

    lineage = dict(lineage)
    base_version = lineage.get(BASE_VERSION_KEY)
    if storage == "delta" and base_version is not None:
        lineage[BASE_WEIGHTS_SHA256_KEY] = tags_of(reg, name, int(base_version)).get(DIGEST_TAG)
    digests: dict[str, Any] = {}
    info = retry(
        lambda: Model.log(
            artifact_path=None,
            name="model",
            flavor=flavor,
            handle=handle,
            storage=storage,
            edited_tensors=list(edited_tensors),
            lineage=lineage,
            digests=digests,
        )
    )
    return info, digests["digest"]


def _complete(
    reg: Registry, name: str, version: int, description: str, on_registered: Callable[[int], None] | None
) -> None:
    """Description, ``on_registered`` (alias, ledger), then the pending tag cleared (see the crashpoints)."""
    c = reg.client
    retry(lambda: c.update_model_version(name, str(version), description=description))
    integrity.crashpoint("after_tags")
    if on_registered is not None:
        with registering(name, version):
            on_registered(version)
    integrity.crashpoint("after_ledger_write")
    # only a pending version needs its registrar (repair asks whether it lives; while this run is
    # RUNNING, a pending version without one is not abandoned); the pending tag is cleared last
    retry(lambda: c.delete_model_version_tag(name, str(version), REGISTRAR_TAG))
    retry(lambda: c.delete_model_version_tag(name, str(version), PENDING_TAG))


def _unregister(reg: Registry, name: str, version: int) -> None:
    """Delete a version whose registration failed, with its ledger rows (production, if it was
    moved to it, goes back: see :func:`~editflow.registry.integrity.discard_version`); model files that
    could not be deleted are logged as a warning."""
    import logging

    try:
        for problem in integrity.discard_version(reg, name, version):
            logging.getLogger(__name__).warning("deleted version %s %s: could not delete %s", name, version, problem)
        return
    except Exception:  # noqa: BLE001 - e.g. the ledger is what failed: delete the version regardless
        pass
    with quiet_deprecations():
        try:
            reg.client.delete_model_version(name, str(version))
        finally:
            ledger.delete_version(reg, name, version)


def record_gate(reg: Registry, name: str, version: int, passed: bool, reasons: Sequence[str], promoted: bool) -> None:
    """Put the gate's decision on the version, where people promote: the ``editflow.gate`` tag and the
    first line of its description."""
    c = reg.client
    decision = "passed" if passed else "failed: " + "; ".join(reasons)
    line = f"Gate {decision}" + ("; promoted to production." if promoted else "; kept as a candidate.")
    description = c.get_model_version(name, str(version)).description or ""
    retry(lambda: c.set_model_version_tag(name, str(version), GATE_TAG, decision[:4000]))
    retry(lambda: c.update_model_version(name, str(version), description=f"{line}\n\n{description}".strip()))


def set_alias(reg: Registry, name: str, alias: str, version: int) -> None:
    c = reg.client
    retry(lambda: c.set_registered_model_alias(name, alias, str(version)))


def is_not_found(exc: BaseException) -> bool:
    """MLflow's "does not exist" answer (the only error that may read as "none")."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def _is_invalid(exc: BaseException) -> bool:
    """MLflow's answer for an alias a model does not have (``INVALID_PARAMETER_VALUE``)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "INVALID_PARAMETER_VALUE"


def aliases_of(reg: Registry, name: str) -> dict[str, int]:
    """alias -> version for a registered model ({} when it is not registered; other errors raise)."""
    try:
        rm = reg.client.get_registered_model(name)
    except Exception as exc:
        if is_not_found(exc):
            return {}
        raise
    return {a: int(v) for a, v in (rm.aliases or {}).items()}


def export_version(reg: Registry, name: str, ref: str | int, out_dir: str | Path) -> Path:
    """Write a plain ``save_pretrained`` directory (weights + tokenizer) of any version."""
    loaded = load_version(reg, name, ref, device="cpu")
    flavor.export_pretrained(loaded.handle, out_dir)
    return Path(out_dir)


def _root_gguf_file(reg: Registry, name: str, base_version: int) -> Path | None:
    """The GGUF file the root base was registered from, if it is still at its recorded path with its
    recorded digest."""
    import json

    from editflow.hashing import file_sha256

    sha = tags_of(reg, name, base_version).get(GGUF_SHA256_TAG)
    if not sha:
        return None
    uri = reg.client.get_model_version_download_uri(name, str(base_version)).rstrip("/")
    meta = json.loads(reg.read_text(f"{uri}/{flavor.META_FILE}"))
    path = Path((meta.get(GGUF_KEY) or {}).get("path", ""))
    return path if path.is_file() and file_sha256(path) == sha else None


def export_gguf_version(reg: Registry, name: str, ref: str | int, out_path: str | Path, dtype: str = "f16") -> Path:
    """Write any version as one GGUF file (``dtype`` f16 or f32). When the root base was registered
    from a GGUF file that is still at its recorded path with its recorded digest, its tokenizer and
    ``general.*`` metadata are copied from it; otherwise they are built from the tokenizer."""
    from editflow.gguf_export import export_gguf

    loaded = load_version(reg, name, ref, device="cpu")
    source = _root_gguf_file(reg, name, loaded.base_version or loaded.version)
    out = Path(out_path)
    if out.is_dir():
        out = out / f"{name}-v{loaded.version}.{dtype}.gguf"
    elif out.suffix.lower() != ".gguf":
        out = out.with_suffix(".gguf")
    return export_gguf(loaded.handle.model, loaded.handle.tokenizer, out, dtype=dtype, source_gguf=source)
