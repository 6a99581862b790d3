"""Tokenisation helpers shared by the engine, the statistics and the evaluation: fact-token positions
and right-padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def encode(tokenizer: object, text: str) -> list[int]:
    """Token ids of ``text`` as the model sees it (special tokens such as BOS included)."""
    return list(tokenizer(text)["input_ids"])  # type: ignore[operator]


def encode_target(tokenizer: object, target: str) -> list[int]:
    """Token ids of a target scored after a prompt: with a leading space, no special tokens."""
    return list(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def fact_token_index(tokenizer: object, prompt: str, subject: str) -> int:
    """Index of the subject's last token in ``prompt.format(subject)``.

    Tokenises the text before the subject plus the subject and takes the boundary (never searches
    token ids), as in the MEMIT code's ``subject_last`` strategy.
    """
    prefix = prompt[: prompt.index("{}")]
    return len(encode(tokenizer, prefix + subject)) - 1


@dataclass
class Batch:
    """Right-padded token ids with their mask and true lengths."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths.to(device))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Stack token-id lists into one right-padded batch."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max()) if len(sequences) else 0
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return Batch(ids, mask, lengths)


def pad_id(tokenizer: object) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid if pid is not None else tokenizer.eos_token_id)  # type: ignore[attr-defined]


def model_positions(model: object) -> int | None:
    """The number of positions the model can attend to (``n_positions`` / ``max_position_embeddings`` /
    ``n_ctx`` of its config), or ``None`` when the config names none."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
