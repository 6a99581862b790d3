"""The bundled default model: the offline fact LM editflow edits out of the box, and its recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def default_model_path() -> Path:
    """Directory of the shipped default model (config, safetensors, tokenizer, card.json)."""
    return _ASSETS / "default_model"


def default_records_path() -> Path:
    """The shipped CounterFact records the default model knows."""
    return _ASSETS / "counterfact" / "records.json"


def default_corpus_dir() -> Path:
    """Shipped covariance-statistics text (stats.txt) and held-out text (heldout.txt)."""
    return _ASSETS / "corpus"


def __getattr__(name: str) -> Any:
    """``build_default_model`` is imported on first use (it needs torch; the paths above do not)."""
    if name == "build_default_model":
        from editflow.demo.recipe import build_default_model

        return build_default_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
