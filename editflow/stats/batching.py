"""From documents to right-padded batches: tokenise, apply the token budget, group by length.

The token budget takes whole documents (each truncated to ``max_length``) in sampling order while
fewer than ``budget`` tokens have been taken, so a larger budget always extends a smaller one: the
documents of budget N are a prefix of those of budget N + M.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

import torch

from editflow.tokens import Batch, pad_right


@dataclass(frozen=True)
class Doc:
    """One tokenised document and its position in the sampling stream."""

    index: int
    ids: tuple[int, ...]


def tokenize(
    texts: Iterable[str], tokenizer: object, max_length: int, start: int = 0, group: int = 64
) -> Iterator[Doc]:
    """Tokenise documents (truncated to ``max_length``), skipping the first ``start`` untokenised."""
    it = islice(enumerate(texts), start, None)
    while chunk := list(islice(it, group)):
        encoded = tokenizer([t for _, t in chunk], truncation=True, max_length=max_length)["input_ids"]  # type: ignore[operator]
        for (index, _), ids in zip(chunk, encoded):
            yield Doc(index, tuple(ids))


@dataclass
class Budget:
    """Takes non-empty documents while fewer than ``tokens`` have been taken; records where it stopped."""

    tokens: int
    taken: int = 0
    docs_end: int = 0
    exhausted: bool = field(default=False)

    def take(self, docs: Iterable[Doc]) -> Iterator[Doc]:
        if self.taken >= self.tokens:
            return
        for doc in docs:
            if not doc.ids:
                continue
            self.taken += len(doc.ids)
            self.docs_end = doc.index + 1
            yield doc
            if self.taken >= self.tokens:
                return
        self.exhausted = True


def length_batches(docs: Iterable[Doc], batch_tokens: int, window: int | None = None) -> Iterator[list[Doc]]:
    """Group documents into batches of at most ``batch_tokens`` padded tokens (one long document may exceed it).

    Documents are sorted by length inside windows of about ``window`` tokens (default 16 batches) so
    that little padding is needed without holding the whole sample in memory.
    """
    window = window or 16 * batch_tokens
    pending: list[Doc] = []
    size = 0
    for doc in docs:
        pending.append(doc)
        size += len(doc.ids)
        if size >= window:
            yield from _pack(pending, batch_tokens)
            pending, size = [], 0
    yield from _pack(pending, batch_tokens)


def _pack(docs: Sequence[Doc], batch_tokens: int) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    for doc in sorted(docs, key=lambda d: (-len(d.ids), d.index)):
        if batch and (len(batch) + 1) * len(batch[0].ids) > batch_tokens:
            yield batch
            batch = []
        batch.append(doc)
    if batch:
        yield batch


def collate(docs: Sequence[Doc], pad_id: int) -> tuple[Batch, torch.Tensor]:
    """A right-padded batch and the stream index of each row."""
    return pad_right([d.ids for d in docs], pad_id), torch.tensor([d.index for d in docs], dtype=torch.long)
