"""Resolve what an edit starts from: the default model's production version, any ``models:/`` URI, a
local path or a hub id; register a base in full the first time it is used."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from editflow import gguf_source
from editflow.config import MemitConfig, default_config
from editflow.models import fingerprint, load_model
from editflow.registry import ledger
from editflow.registry.schema import (
    BASE_VERSION_KEY,
    FINGERPRINT_TAG,
    GGUF_KEY,
    GGUF_SHA256_TAG,
    MODEL_DEFAULTS_KEY,
    N_FACTS_TAG,
    PARENT_VERSION_KEY,
    PRODUCTION,
    ROLE_BASE,
    ROLE_TAG,
    SOURCE_KEY,
    SOURCE_TAG,
    STORAGE_TAG,
    prefixed,
)
from editflow.registry.store import DEFAULT_MODEL_NAME, Registry
from editflow.registry.versions import (
    VersionRef,
    aliases_of,
    find_base,
    load_version,
    log_and_register,
    parse_models_uri,
    versions_of,
)

#: Statistics budget when neither the job nor the model's ``editflow.json`` names one.
DEFAULT_STATS_TOKENS = 1_000_000


def _lock(reg: Registry, name: str):
    """The store-wide lock serialising base registrations of ``name`` (every client, every host)."""
    from editflow.registry import mutex

    return mutex.held(reg, f"register-base:{name}")


def bundled_model_dir() -> Path:
    from editflow import assets

    return assets.default_model_dir()


def ensure_default_model(reg: Registry, device: str | None = None) -> int:
    """Register the bundled model as version 1 of ``editflow-default`` (alias production) if absent."""
    import mlflow

    with _lock(reg, DEFAULT_MODEL_NAME):
        existing = versions_of(reg, DEFAULT_MODEL_NAME)
        if existing:
            return int(existing[0].version)
        handle = load_model(bundled_model_dir(), device=device or "cpu")
        base = VersionRef(
            handle=handle, name=None, version=None, uri=str(bundled_model_dir()), fingerprint=fingerprint(handle.model)
        )
        nested = mlflow.active_run() is not None
        if not nested:
            mlflow.set_experiment(experiment_id=reg.ensure_experiment())
        with mlflow.start_run(run_name="register-default-model", nested=nested):
            card = bundled_model_dir() / "card.json"
            if card.is_file():
                mlflow.log_artifact(str(card), "default_model")
            version = _register_base(
                reg,
                base,
                DEFAULT_MODEL_NAME,
                "The editflow default model: a small GPT-2 "
                "trained on CounterFact facts, shipped with editflow (see card.json).",
            )
        return version


def _register_base(reg: Registry, base: VersionRef, name: str, description: str) -> int:
    """Register ``base`` in full as a new version of ``name``; production if the model has none."""

    def on_registered(version: int) -> None:
        ledger.record_event(reg, name, "register", version, reason="base model")
        if PRODUCTION not in aliases_of(reg, name):
            from editflow.registry.promotion import promote

            promote(reg, name, version, reason="first base version")

    lineage = {
        BASE_VERSION_KEY: None,
        PARENT_VERSION_KEY: None,
        SOURCE_KEY: base.uri,
        MODEL_DEFAULTS_KEY: base.handle.extra.get(MODEL_DEFAULTS_KEY, {}),
    }
    tags = {
        ROLE_TAG: ROLE_BASE,
        FINGERPRINT_TAG: base.fingerprint,
        SOURCE_TAG: base.uri,
        STORAGE_TAG: "full",
        N_FACTS_TAG: "0",
    }
    gguf = base.handle.extra.get(GGUF_KEY)
    if gguf:  # the source file's identity travels with the version: tags, editflow.json, description
        info = gguf_source.GgufInfo(**gguf)
        lineage[GGUF_KEY] = info.to_dict()
        tags.update(prefixed(info.tags()))
    return log_and_register(
        reg,
        name,
        base.handle,
        storage="full",
        lineage=lineage,
        tags=tags,
        description=description,
        on_registered=on_registered,
    )


def resolve_base(
    reg: Registry,
    ref: str,
    device: str | None = None,
    dtype: str | None = None,
    registered_model: str | None = None,
) -> VersionRef:
    """Load the model an edit starts from. ``""`` (or ``"default"``) means the default model's
    production version; ``models:/`` URIs are registered versions; a ``.gguf`` file is looked up by
    its SHA-256 among ``registered_model``'s bases (loaded from the registry when found, dequantised
    otherwise); anything else a path or hub id. Registered versions and local paths are read with
    ``local_files_only`` (never the hub); a hub id is fetched unless ``HF_HUB_OFFLINE`` is set."""
    if gguf_source.is_gguf(ref):
        return _resolve_gguf(reg, ref, registered_model, device, dtype)
    if not ref or ref == "default":
        ensure_default_model(reg)
        return load_version(reg, DEFAULT_MODEL_NAME, "@" + PRODUCTION, device=device, dtype=dtype)
    if ref.startswith("models:/"):
        name, version_ref = parse_models_uri(ref)
        return load_version(reg, name, version_ref, device=device, dtype=dtype)
    handle = load_model(ref, device=device, dtype=dtype)  # local_files_only for a path (editflow.models)
    return VersionRef(handle=handle, name=None, version=None, uri=handle.source, fingerprint=fingerprint(handle.model))


def _resolve_gguf(
    reg: Registry, path: str, registered_model: str | None, device: str | None, dtype: str | None
) -> VersionRef:
    """A GGUF source: its registered base when one has this file's digest, else the dequantised file."""
    info = gguf_source.inspect_gguf(path)
    name = registered_model or registered_name_for(info.path)
    for v in versions_of(reg, name):
        if v.tags.get(ROLE_TAG) == ROLE_BASE and v.tags.get(GGUF_SHA256_TAG) == info.sha256:
            return load_version(reg, name, int(v.version), device=device, dtype=dtype)
    handle = gguf_source.load_gguf(info.path, device=device, dtype=dtype, info=info)
    return VersionRef(handle=handle, name=None, version=None, uri=info.path, fingerprint=fingerprint(handle.model))


def load_any(reg: Registry, ref: str, device: str | None = None, dtype: str | None = None):
    """A :class:`~editflow.models.ModelHandle` for any reference :func:`resolve_base` accepts."""
    return resolve_base(reg, ref, device=device, dtype=dtype).handle


def default_registered_name(base: VersionRef) -> str:
    """The registered model an edit goes to: the base's own, else ``editflow-<model folder or id>``."""
    return base.name or registered_name_for(base.uri)


def registered_name_for(source: str) -> str:
    """``editflow-<model folder, file stem or hub id>``, in the characters registry names allow."""
    stem = Path(source.rstrip("/")).name or "model"
    if gguf_source.is_gguf(stem):
        stem = stem[: -len(".gguf")]
    return "editflow-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-").lower()


def ensure_registered_base(reg: Registry, base: VersionRef, name: str) -> VersionRef:
    """``base`` as a registered version of ``name``: reuse it, find it by fingerprint, or register it."""
    if base.version is not None and base.name == name:
        return base
    with _lock(reg, name):
        version = find_base(reg, name, base.fingerprint)
        if version is None:
            with _registration_run(reg, name):
                version = _register_base(reg, base, name, _base_description(base))
    uri = reg.client.get_model_version_download_uri(name, str(version))
    base.name, base.version, base.base_version, base.base_artifact_uri = name, version, version, uri
    base.uri = f"models:/{name}/{version}"
    base.edited_tensors = []
    return base


@contextlib.contextmanager
def _registration_run(reg: Registry, name: str) -> Iterator[None]:
    """The active run (an edit's), or a run of its own in ``name``'s experiment: a base is always
    logged into a run of this store, never into whatever experiment MLflow last had active."""
    import mlflow

    if mlflow.active_run() is not None:
        yield
        return
    with mlflow.start_run(experiment_id=reg.ensure_experiment(name), run_name=f"register base of {name}"):
        yield


def _base_description(base: VersionRef) -> str:
    gguf = base.handle.extra.get(GGUF_KEY)
    if gguf:
        return (
            f"Base model {gguf['name']} from the GGUF file {Path(gguf['path']).name} ({gguf['file_type']}, "
            f"SHA-256 {gguf['sha256']}), dequantised by transformers and registered in full by editflow."
        )
    return f"Base model {base.uri}, registered in full by editflow."


def config_for(reg: Registry, base: VersionRef, overrides: dict[str, Any]) -> MemitConfig:
    """Published defaults for the architecture, then the model's own recommendations (its
    ``editflow.json``), then what ``editflow tune`` stored with its root base, then overrides."""
    from editflow.registry.tuned import read_tuned

    defaults = dict(base.handle.extra.get(MODEL_DEFAULTS_KEY, {}).get("hparams", {}))
    if base.name and base.base_version is not None:
        defaults.update((read_tuned(reg, base.name, base.base_version) or {}).get("hparams", {}))
    adapter = base.handle.adapter
    return default_config(adapter.model_type, adapter.n_layers, defaults, **overrides)


def stats_tokens(base: VersionRef, explicit: int | None) -> int:
    if explicit:
        return int(explicit)
    return int(base.handle.extra.get(MODEL_DEFAULTS_KEY, {}).get("stats_tokens") or DEFAULT_STATS_TOKENS)
