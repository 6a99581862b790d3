"""Where the files shipped with editflow live: the default model, its CounterFact records, the corpora.

The one home of these paths (importing it needs nothing but the standard library).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def default_model_dir() -> Path:
    """The shipped default model (config, safetensors, tokenizer, card.json, editflow.json)."""
    return ROOT / "default_model"


def counterfact_records_path() -> Path:
    """The shipped CounterFact records (the default model knows them; see PROVENANCE.md)."""
    return ROOT / "counterfact" / "records.json"


def stats_corpus_path() -> Path:
    """The bundled covariance-statistics text, one document per line."""
    return ROOT / "corpus" / "stats.txt"


def heldout_text_path() -> Path:
    """Held-out text for perplexity drift (not part of the statistics corpus)."""
    return ROOT / "corpus" / "heldout.txt"
