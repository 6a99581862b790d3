"""Text corpora for the layer statistics: where documents come from and how they are identified.

A :class:`CorpusSpec` names one source:

* ``bundled`` — ``editflow/assets/corpus/stats.txt``, one document per line;
* a local file — ``.txt`` (one document per blank-line-separated block, or per line with
  ``txt_mode="lines"`` or when the file has no blank line), ``.jsonl`` (one JSON object per line,
  text in ``text_field``), ``.parquet``;
* a local directory — its parquet / arrow / json(l) files (e.g. a local Wikipedia copy), streamed
  with Hugging Face ``datasets``; a directory of ``.txt`` files is read file by file;
* anything else — a Hugging Face dataset name, streamed with ``load_dataset(..., streaming=True)``;
  ``data_files`` / ``data_dir`` point it at local copies.

:func:`corpus_identity` is what the statistics cache keys on: dataset name/config/split/revision for
hub datasets, and the SHA-256 of every local file (never its path, so moving a file keeps its entries).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import editflow
from editflow.hashing import file_sha256

#: Suffixes read as plain files, and the ``datasets`` builder for each suffix found in a directory.
FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
DIR_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
KINDS = ("auto", "bundled", "txt", "jsonl", "parquet", "dir", "hf")


def bundled_corpus_path() -> Path:
    """The corpus shipped with editflow (one document per line)."""
    return Path(editflow.__file__).parent / "assets" / "corpus" / "stats.txt"


@dataclass(frozen=True)
class CorpusSpec:
    """One text source. ``source`` is ``"bundled"``, a local path or a Hugging Face dataset name."""

    source: str = "bundled"
    kind: str = "auto"
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    data_files: tuple[str, ...] = ()
    data_dir: str | None = None
    text_field: str = "text"
    txt_mode: str = "blocks"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown corpus kind {self.kind!r}; choose one of {KINDS}")
        if self.txt_mode not in ("blocks", "lines"):
            raise ValueError("txt_mode must be 'blocks' or 'lines'")
        object.__setattr__(self, "data_files", tuple(str(f) for f in self.data_files))

    def resolved(self) -> "CorpusSpec":
        """This spec with ``kind`` decided (``auto`` looks at the path) and local paths made absolute."""
        if self.kind != "auto":
            return self
        if self.source == "bundled":
            if not bundled_corpus_path().is_file():
                raise FileNotFoundError(f"the bundled corpus is missing ({bundled_corpus_path()}); name another corpus")
            return replace(self, kind="bundled", source=str(bundled_corpus_path()), txt_mode="lines")
        path = Path(self.source).expanduser()
        if path.is_dir():
            return replace(self, kind="dir", source=str(path.resolve()))
        if path.is_file():
            kind = FILE_KINDS.get(path.suffix.lower())
            if kind is None:
                raise ValueError(f"cannot read {path}: use one of {sorted(FILE_KINDS)} or a directory")
            return replace(self, kind=kind, source=str(path.resolve()))
        return replace(self, kind="hf")


# ----------------------------------------------------------------------------- identity


def _dir_files(root: Path) -> list[Path]:
    """Readable files under ``root`` in a fixed order, all of the most common supported suffix."""
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in {*DIR_BUILDERS, ".txt"}
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"no .txt/.jsonl/.json/.parquet/.arrow files under {root}")
    suffixes = [p.suffix.lower() for p in files]
    main = max(sorted(set(suffixes)), key=suffixes.count)
    return [p for p in files if p.suffix.lower() == main]


def _local_files(spec: CorpusSpec) -> list[tuple[str, Path]]:
    """(name recorded in the identity, path) of every local file the spec reads, in reading order."""
    if spec.kind in ("bundled", "txt", "jsonl", "parquet"):
        path = Path(spec.source)
        return [(path.name, path)]
    if spec.kind == "dir":
        root = Path(spec.source)
        return [(p.relative_to(root).as_posix(), p) for p in _dir_files(root)]
    return [(f, Path(f).expanduser()) for f in spec.data_files if Path(f).expanduser().is_file()]


def corpus_identity(spec: CorpusSpec) -> dict:
    """A JSON-able description that changes whenever the documents could change."""
    spec = spec.resolved()
    ident: dict = {"kind": spec.kind, "text_field": spec.text_field}
    if spec.kind in ("bundled", "txt", "dir"):
        ident["txt_mode"] = spec.txt_mode
        ident["txt_reader"] = TXT_READER  # how split_txt cuts documents
    if spec.kind == "hf":
        ident.update(
            name=spec.source,
            config=spec.config,
            split=spec.split,
            revision=spec.revision,
            data_dir=spec.data_dir,
            data_files=list(spec.data_files),
        )
    files = _local_files(spec)
    if files:
        ident["files"] = [[name, file_sha256(path)] for name, path in files]
    return ident


def describe(identity: dict) -> str:
    """One short human-readable line for an identity (used by ``editflow stats list``)."""
    if identity.get("kind") == "hf":
        parts = [identity.get("name"), identity.get("config"), identity.get("split"), identity.get("revision")]
        return "/".join(str(p) for p in parts if p)
    files = identity.get("files") or []
    head = files[0][0] if files else "?"
    more = f" +{len(files) - 1}" if len(files) > 1 else ""
    return f"{identity.get('kind')}:{head}{more}"


# ----------------------------------------------------------------------------- documents

#: Bumped whenever :func:`split_txt` cuts documents differently (part of the cache key).
TXT_READER = 2


def split_txt(text: str, mode: str) -> Iterator[str]:
    """Documents of a text file: blank-line-separated blocks, or non-empty lines.

    A file without any blank line between text lines is read line by line in either mode (one block
    would be the whole file, truncated to one context window).
    """
    lines = text.strip().splitlines()
    if mode == "lines" or all(line.strip() for line in lines):
        yield from (line.strip() for line in lines if line.strip())
        return
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _read_txt(path: Path, mode: str) -> Iterator[str]:
    yield from split_txt(path.read_text(encoding="utf-8"), mode)


def _read_jsonl(path: Path, field_: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if field_ not in record:
                    raise KeyError(f"{path}:{n}: no field {field_!r}")
                yield str(record[field_])


def _read_parquet(path: Path, field_: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field_ not in pf.schema_arrow.names:
        raise KeyError(f"{path}: no column {field_!r} (columns: {pf.schema_arrow.names})")
    for batch in pf.iter_batches(columns=[field_], batch_size=1024):
        yield from (str(t) for t in batch.column(0).to_pylist() if t is not None)


def _read_hf(spec: CorpusSpec, files: list[Path] | None = None, builder: str | None = None) -> Iterator[str]:
    from datasets import load_dataset

    if files is not None:
        ds = load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True)
    else:
        kwargs: dict = {"split": spec.split, "streaming": True}
        if spec.revision:
            kwargs["revision"] = spec.revision
        if spec.data_files:
            kwargs["data_files"] = list(spec.data_files)
        if spec.data_dir:
            kwargs["data_dir"] = spec.data_dir
        ds = load_dataset(spec.source, spec.config, **kwargs)
    for n, record in enumerate(ds):
        if spec.text_field not in record:
            raise KeyError(f"record {n} of {spec.source}: no field {spec.text_field!r} (fields: {sorted(record)})")
        text = record[spec.text_field]
        if text is not None:
            yield str(text)


def iter_documents(spec: CorpusSpec) -> Iterator[str]:
    """Every document of the corpus, in a fixed order."""
    spec = spec.resolved()
    if spec.kind in ("bundled", "txt"):
        yield from _read_txt(Path(spec.source), spec.txt_mode)
    elif spec.kind == "jsonl":
        yield from _read_jsonl(Path(spec.source), spec.text_field)
    elif spec.kind == "parquet":
        yield from _read_parquet(Path(spec.source), spec.text_field)
    elif spec.kind == "dir":
        files = _dir_files(Path(spec.source))
        if files[0].suffix.lower() == ".txt":
            for path in files:
                yield from _read_txt(path, spec.txt_mode)
        else:
            yield from _read_hf(spec, files, DIR_BUILDERS[files[0].suffix.lower()])
    else:
        yield from _read_hf(spec)


def shuffled(items: Iterable[str], seed: int, buffer_size: int) -> Iterator[str]:
    """A seeded shuffle-buffer pass over a stream: same seed and buffer, same order (``buffer_size`` ≤ 1: unchanged)."""
    if buffer_size <= 1:
        yield from items
        return
    rng = random.Random(seed)
    buffer: list[str] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class Sampling:
    """How documents are drawn from a corpus: seeded shuffle buffer over the fixed document order."""

    seed: int = 0
    shuffle_buffer: int = 1000
    version: int = 1

    def key(self) -> dict:
        return {"seed": self.seed, "shuffle_buffer": self.shuffle_buffer, "version": self.version}


def sample_documents(spec: CorpusSpec, sampling: Sampling) -> Iterator[str]:
    """The corpus documents in the sampling order; any token budget takes a prefix of this stream."""
    return shuffled(iter_documents(spec), sampling.seed, sampling.shuffle_buffer)
