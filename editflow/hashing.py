"""SHA-256 of files and of tensors: the one implementation behind every digest editflow records
(statistics caches, GGUF sources, fetched packages, model weights, edit states)."""

from __future__ import annotations

import hashlib
import os

import torch

#: Bytes read per step when hashing a file.
CHUNK = 1 << 22


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in :data:`CHUNK`-sized steps."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def update_with_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    """Feed one named tensor into ``h``: its name, shape and dtype, then its bytes."""
    t = t.detach().contiguous().cpu()
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
