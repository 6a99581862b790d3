"""The bundled default model: the offline fact LM editflow edits out of the box, and its recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from editflow import assets


def default_model_path() -> Path:
    """Directory of the shipped default model (config, safetensors, tokenizer, card.json)."""
    return assets.default_model_dir()


def default_records_path() -> Path:
    """The shipped CounterFact records the default model knows."""
    return assets.counterfact_records_path()


def default_corpus_dir() -> Path:
    """Shipped covariance-statistics text (stats.txt) and held-out text (heldout.txt)."""
    return assets.stats_corpus_path().parent


def __getattr__(name: str) -> Any:
    """``build_default_model`` is imported on first use (it needs torch; the paths above do not)."""
    if name == "build_default_model":
        from editflow.demo.recipe import build_default_model

        return build_default_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
