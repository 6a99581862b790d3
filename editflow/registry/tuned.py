"""Tuned edit defaults stored with a registered base version: the ``editflow.tuned`` model-version tag.

The tag holds compact JSON: ``{"hparams": {...}, "validation": {...}, "run_id": ..., ...}`` where
``hparams`` are :class:`~editflow.config.MemitConfig` overrides chosen by ``editflow tune`` and
``validation`` the figures measured with them on held-back records. The full report is the artifact
``tune_report.json`` of run ``run_id``.
"""

from __future__ import annotations

import json
from typing import Any

from editflow.registry.schema import TUNED_TAG
from editflow.registry.store import Registry, quiet_deprecations
from editflow.registry.versions import retry

#: Keys a stored result must have.
REQUIRED = ("hparams", "validation", "run_id")


def check_result(result: Any) -> dict[str, Any]:
    """``result`` if it is a storable tune result (required keys, valid hyperparameters), else ``ValueError``."""
    from editflow.config import MemitConfig

    if not isinstance(result, dict):
        raise ValueError(f"a tune result must be a JSON object, got {type(result).__name__}")
    missing = [k for k in REQUIRED if k not in result]
    if missing:
        raise ValueError(f"tune result lacks {missing}")
    if not isinstance(result["hparams"], dict) or not isinstance(result["validation"], dict):
        raise ValueError("tune result: hparams and validation must be objects")
    MemitConfig().replace(**result["hparams"])  # raises ValueError on unknown or invalid values
    return result


def encode(result: dict[str, Any]) -> str:
    """Compact, key-sorted JSON of a checked result."""
    return json.dumps(check_result(result), separators=(",", ":"), sort_keys=True, allow_nan=False)


def decode(text: str) -> dict[str, Any]:
    """The result in a tag value, checked (``ValueError`` if it is not one)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{TUNED_TAG} tag is not JSON: {exc.msg}") from None
    return check_result(value)


def store_tuned(reg: Registry, name: str, version: int, result: dict) -> None:
    """Tag version ``version`` of ``name`` with ``result`` and verify the stored value reads back equal."""
    text = encode(result)
    c = reg.client
    retry(lambda: c.set_model_version_tag(name, str(version), TUNED_TAG, text))
    back = read_tuned(reg, name, version)
    if back != json.loads(text):
        raise RuntimeError(f"{TUNED_TAG} of {name} version {version} did not read back as written")


def read_tuned(reg: Registry, name: str, version: int) -> dict | None:
    """The tune result stored on version ``version`` of ``name``; ``None`` when it was never tuned."""
    text = reg.client.get_model_version(name, str(version)).tags.get(TUNED_TAG)
    return None if text is None else decode(text)


def unregister(reg: Registry, name: str, version: int, drop_model: bool) -> None:
    """Delete a version registered by a tune that then failed (and the registered model when ``drop_model``)."""
    from editflow.registry import ledger

    c = reg.client
    with quiet_deprecations():
        try:
            c.delete_model_version(name, str(version))
        finally:
            ledger.delete_version(reg, name, version)
        if drop_model:
            c.delete_registered_model(name)
