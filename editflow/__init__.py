"""editflow: MLflow-tracked mass knowledge editing (MEMIT, AlphaEdit) for Hugging Face causal LMs.

The engine's public API is importable from here (loaded lazily so the CLI starts fast)::

    from editflow import load_model, load_requests, default_config, layer_covariances, edit, apply_deltas
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "editflow.models",
    "ModelHandle": "editflow.models",
    "Adapter": "editflow.models",
    "detect_adapter": "editflow.models",
    "fingerprint": "editflow.models",
    "EditRequest": "editflow.requests",
    "RequestError": "editflow.requests",
    "parse_requests": "editflow.requests",
    "load_requests": "editflow.requests",
    "parse_request_text": "editflow.requests",
    "MemitConfig": "editflow.config",
    "default_config": "editflow.config",
    "edit": "editflow.memit",
    "EditResult": "editflow.memit",
    "RequestDiagnostics": "editflow.memit",
    "apply_deltas": "editflow.memit",
    "restore": "editflow.memit",
    "undo_deltas": "editflow.memit",
    "compute_targets": "editflow.memit",
    "layer_covariances": "editflow.stats",
    "CorpusSpec": "editflow.stats",
    "Evaluator": "editflow.evaluate",
    "EditJob": "editflow.pipeline",
    "run_edit": "editflow.pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'editflow' has no attribute {name!r}")
