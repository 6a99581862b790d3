"""The on-disk cache of layer statistics: keys, atomic writes, per-key locks, verification.

Layout: ``<root>/<weights-fingerprint[:16]>/<module>/<key>.npz`` and ``<key>.json`` beside it
(the manifest: key fields, SHA-256 of the npz, created time, tokens, editflow version, source).
``<key>`` is the SHA-256 of the key fields (:class:`CacheKey`). An entry is used only when its
manifest names the expected key, re-hashes to it, and the npz matches the recorded checksum;
anything else is reported and recomputed. The root is ``cache_dir``, else ``$EDITFLOW_CACHE/stats``,
else ``platformdirs.user_cache_dir("editflow")/stats``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock, Timeout

from editflow.hashing import file_sha256
from editflow.stats.formats import read_npz, write_npz
from editflow.stats.moments import LayerStats
from editflow.stats.sanity import CovarianceError, check_covariance, covariance_problems

log = logging.getLogger(__name__)

#: Bumped whenever the meaning of a cached file changes.
CACHE_FORMAT = 1


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where statistics are cached (see the module docstring)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("EDITFLOW_CACHE"):
        return Path(os.environ["EDITFLOW_CACHE"]).expanduser() / "stats"
    import platformdirs

    return Path(platformdirs.user_cache_dir("editflow")) / "stats"


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything one layer's statistics depend on."""

    weights: str  # fingerprint of the parameters the statistic depends on (editflow.stats.fingerprint)
    module: str
    layer: int
    tokenizer: str
    corpus: dict
    tokens: int  # token budget
    max_length: int
    model_dtype: str
    stats_dtype: str
    sampling: dict = field(default_factory=dict)
    format: int = CACHE_FORMAT

    def fields(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return _digest(self.fields())

    def base_digest(self) -> str:
        """Digest of every field but the token budget: entries sharing it extend one another."""
        return _digest({k: v for k, v in self.fields().items() if k != "tokens"})

    @classmethod
    def from_fields(cls, fields: dict) -> "CacheKey":
        return cls(**fields)


@dataclass
class CacheEntry:
    """One cached layer statistic: the npz path, its manifest, and whether it was reused."""

    path: Path
    manifest: dict
    hit: bool

    @property
    def manifest_path(self) -> Path:
        return manifest_path(self.path)

    @property
    def key(self) -> str:
        return self.path.stem


def entry_path(root: Path, key: CacheKey) -> Path:
    return root / key.weights[:16] / key.module / f"{key.digest()}.npz"


def manifest_path(npz: Path) -> Path:
    return npz.with_suffix(".json")


class CacheError(ValueError):
    """The statistics cache cannot be written (read-only, or a path component is not a directory)."""


@contextlib.contextmanager
def _writable(root: Path) -> Iterator[None]:
    """Turn an OS error while writing under ``root`` into a :class:`CacheError` that says what to do."""
    try:
        yield
    except Timeout:
        raise
    except OSError as exc:
        raise CacheError(
            f"statistics cache {root} is not writable ({exc.strerror or exc}: "
            f"{exc.filename or root}); pass a writable --stats-cache / --cache-dir or set "
            "EDITFLOW_CACHE"
        ) from None


def _writable_dir(folder: Path) -> None:
    """Create ``folder`` and check that this process may write there (else :class:`PermissionError`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied", str(folder))


# ----------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> str:
    """Write via a temp file in the same directory, fsync, ``os.replace``; return the file's SHA-256."""
    _writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        sha = file_sha256(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return sha


def write_entry(
    root: Path, key: CacheKey, stats: LayerStats, info: dict | None = None, checked: bool = False
) -> CacheEntry:
    """Store ``stats`` under ``key`` (npz first, then the manifest that vouches for it). The covariance
    is refused unless finite, symmetric and PSD (``checked``: the caller has just verified it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ef_version = version("editflow")
    except PackageNotFoundError:
        ef_version = "unknown"
    path = entry_path(root, key)
    if not checked:
        check_covariance(stats.mom2(), key.layer, "not written to the cache")
    with _writable(root):
        sha = _atomic_write(path, lambda f: write_npz(f, stats))
    manifest = {
        "key": key.digest(),
        "base_key": key.base_digest(),
        "fields": key.fields(),
        "npz_sha256": sha,
        "npz_bytes": path.stat().st_size,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tokens": stats.count,
        "docs": stats.docs,
        "editflow_version": ef_version,
        "source": "computed",
        **(info or {}),
    }
    with _writable(root):
        _atomic_write(manifest_path(path), lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    return CacheEntry(path, manifest, hit=False)


# ----------------------------------------------------------------------------- reading and checking


def check_entry(npz: Path, expected: str | None = None, sanity: bool = True) -> tuple[list[str], dict | None]:
    """Problems with the entry at ``npz`` (empty when valid) and its manifest; with ``sanity``, also a
    covariance that is not finite, symmetric and positive semi-definite."""
    mpath = manifest_path(npz)
    if not npz.exists():
        return [f"{npz}: missing"], None
    if not mpath.exists():
        return [f"{npz}: no manifest"], None
    try:
        manifest = json.loads(mpath.read_text())
        fields_digest = CacheKey.from_fields(manifest["fields"]).digest()
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{mpath}: unreadable manifest ({exc})"], None
    problems = []
    if manifest.get("key") != npz.stem or fields_digest != npz.stem:
        problems.append(
            f"{npz}: key mismatch (file {npz.stem[:12]}, manifest {str(manifest.get('key'))[:12]},"
            f" fields {fields_digest[:12]})"
        )
    if expected is not None and npz.stem != expected:
        problems.append(f"{npz}: not the expected key {expected[:12]}")
    if file_sha256(npz) != manifest.get("npz_sha256"):
        problems.append(f"{npz}: checksum mismatch (truncated or modified)")
        return problems, manifest
    try:
        stats, _ = read_npz(npz)
        if stats.count != manifest.get("tokens"):
            problems.append(f"{npz}: count {stats.count} != manifest tokens {manifest.get('tokens')}")
        if sanity:
            layer = manifest.get("fields", {}).get("layer", "?")
            problems += [f"{npz}: layer {layer} covariance is {p}" for p in covariance_problems(stats.mom2())]
    except (ValueError, OSError, KeyError) as exc:
        problems.append(f"{npz}: unreadable ({exc})")
    return problems, manifest


def read_entry(root: Path, key: CacheKey, report: bool = True) -> tuple[LayerStats, CacheEntry] | None:
    """The valid entry for ``key``, or ``None``; with ``report``, a damaged file is warned about.

    An intact entry whose covariance is unusable (not finite, symmetric, PSD) raises
    :class:`~editflow.stats.sanity.CovarianceError`: it was put there on purpose (imported), so it is
    never silently replaced.
    """
    path = entry_path(root, key)
    if not path.exists() and not manifest_path(path).exists():
        return None
    problems, manifest = check_entry(path, key.digest(), sanity=False)
    if problems:
        if report:
            msg = "ignoring invalid statistics cache entry, recomputing: " + "; ".join(problems)
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return None
    stats, _ = read_npz(path)
    check_covariance(stats.mom2(), key.layer, f"cache entry {path}; remove it or import valid statistics")
    return stats, CacheEntry(path, manifest, hit=True)  # type: ignore[arg-type]


def find_prefix(root: Path, key: CacheKey) -> tuple[LayerStats, CacheEntry] | None:
    """The valid entry with the same key except a smaller token budget, covering the most tokens."""
    folder = entry_path(root, key).parent
    candidates = []
    for mpath in folder.glob("*.json") if folder.exists() else ():
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError:
            continue
        if (
            manifest.get("base_key") == key.base_digest()
            and manifest.get("docs") is not None
            and 0 < manifest.get("tokens", 0) < key.tokens
        ):
            candidates.append((manifest["tokens"], manifest["fields"]))
    for _, fields in sorted(candidates, key=lambda c: -c[0]):
        try:
            found = read_entry(root, CacheKey.from_fields(fields))
        except CovarianceError as exc:  # an unusable prefix is not extended; the layer is computed afresh
            warnings.warn(f"not extending cached statistics: {exc}", RuntimeWarning, stacklevel=2)
            continue
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def locked(root: Path, keys: list[CacheKey], timeout: float = -1) -> Iterator[None]:
    """Hold the per-key locks of ``keys`` (taken in a fixed order, so two callers never deadlock)."""
    paths = sorted({entry_path(root, k) for k in keys})
    with contextlib.ExitStack() as stack:
        with _writable(root):
            for path in paths:
                _writable_dir(path.parent)
                stack.enter_context(FileLock(str(path) + ".lock", timeout=timeout))
        yield


def iter_entries(root: Path) -> Iterator[Path]:
    """Every npz or manifest stem under ``root`` (as the npz path), in a fixed order."""
    if not root.exists():
        return
    stems = {
        p.with_suffix(".npz") for p in root.rglob("*") if p.suffix in (".npz", ".json") and not p.name.startswith(".")
    }
    yield from sorted(stems)


#: Temporary files older than this in the cache are left by a killed writer (writes take seconds).
STALE_TEMP_S = 3600.0


def remove_stale_temp_files(root: Path, older_than_s: float = STALE_TEMP_S) -> list[Path]:
    """Delete the ``.<entry>.*.tmp`` files a killed writer left in the cache; return what was removed."""
    import time

    removed = []
    if not Path(root).is_dir():
        return removed
    cutoff = time.time() - older_than_s
    for tmp in Path(root).rglob(".*.tmp"):
        try:
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue  # another process removed it, or it is not ours to remove
    return removed
