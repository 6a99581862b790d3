"""The default-model recipe's options (plain dataclasses, so the CLI can show them without torch).

The defaults are the recipe of the shipped model; each field's ``help`` is the CLI's help text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class CorpusOptions:
    """What the fact corpus holds besides each record's own prompts."""

    n_extra_phrasings: int = _opt(3, "more phrasings of the relation per record subject")
    n_neighbour_phrasings: int = _opt(3, "more phrasings per neighbourhood subject read off a relation template")
    filler_ratio: float = _opt(0.15, "share of synthetic filler documents")


@dataclass
class TrainOptions:
    """Model size and schedule."""

    n_layer: int = _opt(6, "transformer blocks")
    n_embd: int = _opt(256, "residual width")
    n_head: int = _opt(8, "attention heads")
    n_inner: int = _opt(1024, "MLP width")
    n_positions: int = _opt(64, "context length")
    vocab_size: int = _opt(2048, "BPE vocabulary size")
    dropout: float = _opt(0.0, "dropout everywhere")
    lr: float = _opt(2e-3, "peak learning rate (warm-up, then cosine to 10 %)")
    weight_decay: float = _opt(0.01, "AdamW weight decay of matrices")
    warmup_steps: int = _opt(100, "linear warm-up steps")
    batch_size: int = _opt(16, "rows of n_positions tokens per step")
    epochs: float = _opt(22.0, "passes over the corpus (the cosine schedule's length)")
    max_minutes: float = _opt(58.0, "stop training after this many minutes")
    eval_every: int = _opt(400, "steps between checkpoint evaluations")
    patience: int = _opt(4, "stop after this many evaluations without a better checkpoint (once rewrite ≥ 99 %)")
    seed: int = _opt(0, "seeds corpus, tokenizer order and training")
    threads: int = _opt(2, "torch CPU threads (results are deterministic for a fixed count)")
    subject_bottleneck: float = _opt(0.6, "share of subject-fact documents trained with the subject-bottleneck mask")
