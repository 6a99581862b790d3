"""GGUF files as model sources: inspect the header, then load through transformers' own GGUF support.

transformers dequantises every tensor (Q4_1, Q8_0, …) to a float dtype on load, so the model editflow
edits is a plain Hugging Face model; the GGUF's identity (SHA-256, quantisation, original name) is
kept in :class:`GgufInfo` and ends up in the registered version's tags and card. ``gguf`` and
``accelerate`` are the optional extra ``editflow[gguf]``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from editflow.hashing import file_sha256

EXTRA_HINT = "pip install 'editflow[gguf]'"
#: Header fields that are not architectures in transformers' list of GGUF-loadable names.
_NOT_ARCHITECTURES = {"general", "tokenizer"}


class GgufError(ValueError):
    """A GGUF file editflow cannot use: missing extra, corrupt or truncated, unsupported architecture."""


@dataclass(frozen=True)
class GgufInfo:
    """What identifies a GGUF file: its digest and the header fields a user recognises it by."""

    path: str
    sha256: str
    size: int
    architecture: str
    name: str
    file_type: str  # the quantisation named in the header, e.g. MOSTLY_Q4_1
    tensor_types: dict[str, int]  # how many tensors of each ggml type (Q4_1, F32, …)
    n_tensors: int

    def tags(self) -> dict[str, str]:
        """The version tags (short values only; the full record goes into the card)."""
        return {
            "source_format": "gguf",
            "gguf.sha256": self.sha256,
            "gguf.file_type": self.file_type,
            "gguf.name": self.name,
            "gguf.architecture": self.architecture,
            "gguf.file": Path(self.path).name,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_gguf(ref: str | os.PathLike) -> bool:
    """A reference that names a GGUF file (by its suffix; the file need not be valid)."""
    return str(ref).lower().endswith(".gguf")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require_extra() -> None:
    """Raise :class:`GgufError` naming the extra when ``gguf`` or ``accelerate`` is not installed."""
    missing = [m for m in ("gguf", "accelerate") if not _importable(m)]
    if missing:
        raise GgufError(f"loading a GGUF file needs {' and '.join(missing)}: {EXTRA_HINT}")


def supported_architectures() -> list[str]:
    """Architectures transformers can load from GGUF (its own list)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_ARCHITECTURES)


def header_field(reader: Any, key: str) -> Any:
    """One GGUF header value (None when absent)."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def inspect_gguf(path: str | os.PathLike) -> GgufInfo:
    """Read and check a GGUF file's header and tensor table (no dequantisation).

    Raises :class:`GgufError` for a missing extra, a file that is not a complete GGUF (truncated,
    corrupt) or an architecture transformers cannot load.
    """
    require_extra()
    from gguf import GGUFReader, LlamaFileType

    path = Path(path)
    if not path.is_file():
        raise GgufError(f"{path}: no such GGUF file" if not path.exists() else f"{path}: not a regular file")
    try:
        reader = GGUFReader(str(path))
        tensors = reader.tensors
        end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    except Exception as exc:  # noqa: BLE001 - the reader fails in many ways on a damaged file
        raise GgufError(
            f"{path.name} is not a valid GGUF file (truncated or corrupt): {type(exc).__name__}: {str(exc)[:120]}"
        ) from None
    size = path.stat().st_size
    if not tensors or end > size:
        raise GgufError(f"{path.name} is truncated: its tensors need {end:,} bytes, the file has {size:,}")
    arch = str(header_field(reader, "general.architecture") or "unknown")
    supported = supported_architectures()
    if arch not in supported:
        raise GgufError(
            f"{path.name}: GGUF architecture {arch!r} cannot be loaded by transformers; "
            f"supported: {', '.join(supported)}"
        )
    file_type = header_field(reader, "general.file_type")
    try:
        file_type_name = LlamaFileType(int(file_type)).name if file_type is not None else "unknown"
    except ValueError:
        file_type_name = f"type {file_type}"
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return GgufInfo(
        path=str(path.resolve()),
        sha256=file_sha256(path),
        size=size,
        architecture=arch,
        name=str(header_field(reader, "general.name") or path.stem),
        file_type=file_type_name,
        tensor_types=dict(sorted(counts.items())),
        n_tensors=len(tensors),
    )


def _as_plain_model(model: Any) -> None:
    """Drop transformers' GGUF quantizer from a model whose weights it dequantised: it is then an
    ordinary model (editable, and saved with ``save_pretrained``), as its weights already are."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def load_gguf(
    path: str | os.PathLike, device: str | None = None, dtype: str | None = None, info: GgufInfo | None = None
):
    """Load a GGUF model dequantised to ``dtype`` (default float32) as a :class:`~editflow.models.ModelHandle`.

    The handle's ``extra["gguf"]`` holds the :class:`GgufInfo` as a dict.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from editflow import progress
    from editflow.fetch import packaged_defaults
    from editflow.models import ModelHandle, default_device, detect_adapter, prepare_tokenizer, resolve_dtype

    info = info or inspect_gguf(path)
    folder, name = str(Path(info.path).parent), Path(info.path).name
    torch_dtype = resolve_dtype(dtype) or torch.float32
    progress.note(
        f"loading {name} ({info.file_type}, {info.size / 2**20:.0f} MB), dequantising to "
        f"{str(torch_dtype).removeprefix('torch.')} …"
    )
    with progress.bar(total=2, desc="load gguf", unit="step") as bar:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch_dtype,
            local_files_only=True,
            quantization_config=GgufConfig(dequantize=True),
        )
        _as_plain_model(model)
        bar.update(1)
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True))
        bar.update(1)
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise GgufError(
            f"{name}: dequantised weights are not finite in {len(bad)} tensor(s), e.g. {bad[0]} (corrupt tensor data)"
        )
    model.to(device or default_device()).eval()
    return ModelHandle(
        model=model,
        tokenizer=tokenizer,
        adapter=detect_adapter(model),
        source=info.path,
        extra={"model_defaults": packaged_defaults(info.sha256), "gguf": info.to_dict()},
    )
