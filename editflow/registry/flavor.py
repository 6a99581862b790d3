"""The ``editflow`` MLflow model flavor (pyfunc-compatible).

A model directory holds ``editflow.json`` (storage kind and lineage) and either

* ``weights/`` — a full ``save_pretrained`` directory with its tokenizer (``storage: full``), or
* ``edited.safetensors`` — only the tensors that differ from the root base model, which is referenced
  by artifact URI and registry URI (``storage: delta``). Loading puts them over the base.

``mlflow.pyfunc.load_model("models:/NAME@production")`` returns :class:`EditflowPyfunc`, which
completes prompts greedily.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from editflow.models import ModelHandle
from editflow.models import load_model as load_hf_model
from editflow.registry.schema import (
    BASE_ARTIFACT_URI_KEY,
    BASE_MODEL_URI_KEY,
    BASE_WEIGHTS_SHA256_KEY,
    EDITED_TENSORS_KEY,
    MODEL_DEFAULTS_KEY,
    STORAGE_KEY,
    WEIGHTS_SHA256_KEY,
)
from editflow.registry.store import Registry

FLAVOR_NAME = "editflow"
META_FILE = "editflow.json"
WEIGHTS_DIR = "weights"
EDITED_FILE = "edited.safetensors"


#: Runtime packages named in a model's requirements (editflow's own wheel pins the rest).
RUNTIME_PACKAGES = ("torch", "transformers", "safetensors", "mlflow")
#: Model subdirectory holding the bundled editflow wheel (referenced from requirements.txt).
WHEELS_DIR = "wheels"
#: Wheels (one per source digest) kept in the cache.
WHEELS_KEPT = 8
_BUILD_WHEEL = "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))"


def _version_range(pkg: str) -> str:
    """``torch>=2.13,<3`` from an installed ``2.13.0+cpu``: the installed minor release up to the
    next major one, no local label (``+cpu``), so pip can find it on any index."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        v = Version(version(pkg))
    except PackageNotFoundError:
        return pkg
    return f"{pkg}>={v.major}.{v.minor},<{v.major + 1}"


def _pip_requirements(editflow_requirement: str | None = None) -> list[str]:
    """The model's pip requirements: editflow (by default the path of its bundled wheel, relative to
    the model directory) then version ranges of the runtime packages."""
    from importlib.metadata import version

    return [editflow_requirement or f"editflow=={version('editflow')}", *map(_version_range, RUNTIME_PACKAGES)]


def _package_files(package: Path) -> list[Path]:
    """Every file of the package tree, bytecode caches left out, in a stable order."""
    return sorted(
        p
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )


def _source_project() -> Path | None:
    """The project directory of the running editflow when it runs from a source tree (editable
    install or checkout), else ``None``."""
    import editflow

    root = Path(editflow.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and 'name = "editflow"' in pyproject.read_text() else None


def _installed_pyproject() -> str:
    """A ``pyproject.toml`` rebuilding the installed (non-source) editflow from its metadata."""
    from importlib.metadata import distribution

    dist = distribution("editflow")
    deps = [r for r in dist.requires or [] if "extra ==" not in r]
    scripts = "".join(f'{ep.name} = "{ep.value}"\n' for ep in dist.entry_points if ep.group == "console_scripts")
    return "\n".join(
        [
            '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n',
            f'[project]\nname = "editflow"\nversion = "{dist.version}"\n'
            f'requires-python = "{dist.metadata.get("Requires-Python") or ">=3.10"}"\ndependencies = {json.dumps(deps)}\n',
            f"[project.scripts]\n{scripts}",
            '[tool.setuptools.packages.find]\ninclude = ["editflow*"]\n',
            '[tool.setuptools.package-data]\neditflow = ["assets/**/*"]\n',
        ]
    )


def _source_files() -> dict[str, Path | bytes]:
    """What builds the running editflow, by relative path: project files (from the source tree, or
    a ``pyproject.toml`` made from the installed metadata) and every package file."""
    import editflow

    package = Path(editflow.__file__).resolve().parent
    project = _source_project()
    if project is None:
        files: dict[str, Path | bytes] = {"pyproject.toml": _installed_pyproject().encode()}
    else:
        files = {n: project / n for n in ("pyproject.toml", "README.md", "LICENSE") if (project / n).is_file()}
    files.update({f"editflow/{f.relative_to(package).as_posix()}": f for f in _package_files(package)})
    return files


def source_digest(files: dict[str, Path | bytes]) -> str:
    """sha256 over the relative paths and contents of :func:`_source_files`."""
    import hashlib

    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0")
        content = files[rel]
        h.update(content if isinstance(content, bytes) else content.read_bytes())
    return h.hexdigest()


def _stage(files: dict[str, Path | bytes], dst: Path) -> Path:
    """Write :func:`_source_files` under ``dst`` (a buildable project)."""
    for rel, content in files.items():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copy2(content, target)
    return dst


def wheel_cache() -> Path:
    """Built wheels: ``$EDITFLOW_CACHE/wheels``, else the user cache directory's ``wheels``."""
    if os.environ.get("EDITFLOW_CACHE"):
        return Path(os.environ["EDITFLOW_CACHE"]).expanduser() / "wheels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("editflow")) / "wheels"


def _build_wheel(source: Path, out: Path) -> Path:
    """Build ``source`` into a wheel in ``out`` with the setuptools build backend (no network, no pip)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _BUILD_WHEEL, str(out)], cwd=source, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the editflow wheel failed: {proc.stderr.strip()[-2000:]}")
    return out / proc.stdout.strip().splitlines()[-1]


def editflow_wheel(files: dict[str, Path | bytes] | None = None) -> Path:
    """The wheel of the running editflow (or of ``files``, as :func:`_source_files` gives them), built
    once per source digest and cached (see :func:`wheel_cache`); concurrent builders each build
    privately and the last rename wins (same content)."""
    files = files or _source_files()
    slot = wheel_cache() / source_digest(files)[:24]
    found = sorted(slot.glob("editflow-*.whl"))
    if found:
        os.utime(slot)  # recently used: kept by _prune_wheels
        return found[0]
    with tempfile.TemporaryDirectory(prefix="editflow-wheel-") as tmp:
        built = _build_wheel(_stage(files, Path(tmp) / "src"), Path(tmp) / "out")
        slot.mkdir(parents=True, exist_ok=True)
        partial = slot / f".{built.name}.{os.getpid()}.part"
        shutil.copy2(built, partial)
        os.replace(partial, slot / built.name)
    _prune_wheels(slot.parent)
    return slot / built.name


def _prune_wheels(cache: Path, keep: int = WHEELS_KEPT) -> None:
    """Delete all but the ``keep`` newest digest folders (each source change makes a new ~20 MB wheel)."""
    slots = sorted((p for p in cache.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in slots[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _bundle_editflow(model_dir: Path) -> str | None:
    """Copy editflow's wheel into ``model_dir/wheels``; the requirement line that installs it
    (relative to the model directory, as MLflow's environment managers resolve it), or ``None``
    (with a warning) when no wheel can be built."""
    import logging

    try:
        wheel = editflow_wheel()
    except (OSError, RuntimeError) as exc:
        logging.getLogger(__name__).warning(
            "editflow is not bundled with the model (%s); its requirements name editflow==<version> instead", exc
        )
        return None
    (model_dir / WHEELS_DIR).mkdir(exist_ok=True)
    shutil.copy2(wheel, model_dir / WHEELS_DIR / wheel.name)
    return f"{WHEELS_DIR}/{wheel.name}"


def write_environment(model_dir: Path) -> list[str]:
    """Write ``requirements.txt``, ``conda.yaml`` and ``python_env.yaml`` (with the bundled wheel);
    returns the requirements."""
    import yaml
    from mlflow.utils.environment import _mlflow_conda_env, _PythonEnv

    reqs = _pip_requirements(_bundle_editflow(model_dir))
    (model_dir / "requirements.txt").write_text("\n".join(reqs) + "\n")
    (model_dir / "conda.yaml").write_text(yaml.safe_dump(_mlflow_conda_env(additional_pip_deps=reqs)))
    _PythonEnv.current().to_yaml(model_dir / "python_env.yaml")
    return reqs


def save_model(
    path: str | os.PathLike,
    handle: ModelHandle,
    *,
    storage: str = "full",
    edited_tensors: list[str] | None = None,
    lineage: dict[str, Any] | None = None,
    mlflow_model: Any = None,
    digests: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Write ``handle``'s model to ``path`` as an editflow model directory with an MLmodel file.

    ``storage="delta"`` keeps only ``edited_tensors`` (every tensor that differs from the root base:
    the rewrite weights edited anywhere in the lineage); ``lineage`` must then carry
    ``base_artifact_uri`` (and ideally ``base_model_uri`` and ``base_weights_sha256``, the base's
    manifest digest). The SHA-256 of each weights file goes into ``editflow.json``; ``digests``, when
    given, receives ``manifest`` and its ``digest`` (the version's ``editflow.weights_sha256`` tag).
    """
    from mlflow.models import Model, ModelSignature
    from mlflow.pyfunc import add_to_model
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from editflow.registry import integrity

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {STORAGE_KEY: storage, **(lineage or {})}
    if storage == "full":
        handle.model.save_pretrained(path / WEIGHTS_DIR, safe_serialization=True)
        handle.tokenizer.save_pretrained(path / WEIGHTS_DIR)  # type: ignore[attr-defined]
    elif storage == "delta":
        if not edited_tensors or not meta.get(BASE_ARTIFACT_URI_KEY):
            raise ValueError("delta storage needs the edited tensor names and the base's artifact URI")
        from safetensors.torch import save_file

        state = handle.model.state_dict()
        save_file({k: state[k].detach().contiguous().cpu() for k in edited_tensors}, str(path / EDITED_FILE))
        meta[EDITED_TENSORS_KEY] = sorted(edited_tensors)
    else:
        raise ValueError(f"storage must be 'full' or 'delta', got {storage!r}")
    manifest = integrity.make_manifest(path, storage, base=meta.pop(BASE_WEIGHTS_SHA256_KEY, None))
    meta[WEIGHTS_SHA256_KEY] = manifest
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if digests is not None:
        digests.update(manifest=manifest, digest=integrity.manifest_digest(manifest))

    mlflow_model = mlflow_model or Model()
    mlflow_model.signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 8)]),
    )
    mlflow_model.add_flavor(FLAVOR_NAME, storage=storage, model_type=handle.adapter.model_type)
    add_to_model(
        mlflow_model,
        loader_module="editflow.registry.flavor",
        env={"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
    )
    write_environment(path)
    mlflow_model.save(str(path / "MLmodel"))


def read_tensors(model_uri: str, names: list[str], reg: Registry | None = None) -> dict[str, torch.Tensor]:
    """Selected tensors of a full-storage model, read from its safetensors without loading the model
    (a local artifact store is read in place; a remote one, of ``reg``, downloads only ``weights/``)."""
    from urllib.parse import unquote, urlparse

    from safetensors import safe_open

    parsed = urlparse(model_uri)
    if parsed.scheme in ("", "file") and Path(unquote(parsed.path)).is_dir():
        weights = Path(unquote(parsed.path)) / WEIGHTS_DIR
        tmp = None
    else:
        tmp = tempfile.mkdtemp(prefix="editflow-weights-")
        weights = Path(download(model_uri.rstrip("/") + "/" + WEIGHTS_DIR, tmp, reg))
    try:
        index = weights / "model.safetensors.index.json"
        shard_of = (
            json.loads(index.read_text())["weight_map"] if index.is_file() else {n: "model.safetensors" for n in names}
        )
        out = {}
        for name in names:
            with safe_open(str(weights / shard_of[name]), framework="pt") as f:
                out[name] = f.get_tensor(name)
        return out
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(local_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(local_dir) / META_FILE).read_text())


def local_path(model_uri: str) -> Path | None:
    """The directory of a model on this machine (a path or a ``file://`` URI), else ``None``."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(model_uri)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (or a Windows drive letter)
        path = Path(model_uri)
    else:
        return None
    return path if path.is_dir() else None


def download(model_uri: str, dst: str | None = None, reg: Registry | None = None) -> str:
    """A local directory with the model at ``model_uri`` (a local path is used as is), from ``reg``'s
    store (default: the store the environment names, as when MLflow loads a model to serve it)."""
    if Path(model_uri).is_dir():
        return str(model_uri)
    return (reg or Registry()).download(model_uri, dst)


def load_local(
    local_dir: str | os.PathLike,
    device: str | None = None,
    dtype: str | None = None,
    expected: str | None = None,
    reg: Registry | None = None,
) -> ModelHandle:
    """Load an editflow model directory, reconstructing delta versions over their base (from ``reg``'s
    store; default: the one the environment names). Every weights file is checked against the digests
    in ``editflow.json`` first, and those against ``expected`` (the version's
    ``editflow.weights_sha256`` tag) when given; a delta's base is checked against the digest the
    delta recorded. A mismatch raises :class:`~editflow.registry.integrity.WeightsIntegrityError`
    naming the file."""
    from editflow.registry import integrity

    local_dir = Path(local_dir)
    meta = read_meta(local_dir)
    integrity.verify_dir(local_dir, meta, expected)
    if meta[STORAGE_KEY] == "full":
        handle = load_hf_model(local_dir / WEIGHTS_DIR, device=device, dtype=dtype)
    else:
        from safetensors.torch import load_file

        reg = reg or Registry()
        handle = load_model(
            meta[BASE_ARTIFACT_URI_KEY],
            device=device,
            dtype=dtype,
            fallback_uri=meta.get(BASE_MODEL_URI_KEY),
            expected=integrity.base_expected(reg, meta),
            reg=reg,
        )
        edited = load_file(str(local_dir / EDITED_FILE))
        params = dict(handle.model.state_dict())
        with torch.no_grad():
            for name, tensor in edited.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    handle.extra["editflow"] = meta
    handle.extra[MODEL_DEFAULTS_KEY] = meta.get(MODEL_DEFAULTS_KEY) or handle.extra.get(MODEL_DEFAULTS_KEY, {})
    return handle


def load_model(
    model_uri: str,
    device: str | None = None,
    dtype: str | None = None,
    fallback_uri: str | None = None,
    expected: str | None = None,
    reg: Registry | None = None,
) -> ModelHandle:
    """Load an editflow model from any MLflow URI (``models:/NAME/3``, ``runs:/...``, a file URI) of
    ``reg``'s store; a model on this machine is read in place (verified weights are not hashed again
    while unchanged)."""
    local = local_path(model_uri)
    if local is not None:
        return load_local(local, device=device, dtype=dtype, expected=expected, reg=reg)
    with tempfile.TemporaryDirectory(prefix="editflow-model-") as tmp:
        try:
            local_dir = download(model_uri, tmp, reg)
        except Exception:
            if fallback_uri is None:
                raise
            local_dir = download(fallback_uri, tmp, reg)
        return load_local(local_dir, device=device, dtype=dtype, expected=expected, reg=reg)


#: Serving limits: prompts per request, new tokens per prompt, characters per prompt (one request of a
#: served model must stay well under the scoring server's timeout on a CPU).
MAX_PROMPTS = 256
MAX_NEW_TOKENS = 256
MAX_PROMPT_CHARS = 8192


def check_serving_request(prompts: list[str], max_new_tokens: int) -> None:
    """Raise an MLflow INVALID_PARAMETER_VALUE error (HTTP 400) for a request beyond the limits."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    problem = None
    if not prompts:
        problem = "no prompts"
    elif len(prompts) > MAX_PROMPTS:
        problem = f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS}"
    elif not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        problem = f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}"
    else:
        longest = max(len(p) for p in prompts)
        if longest > MAX_PROMPT_CHARS:
            problem = f"a prompt of {longest:,} characters; at most {MAX_PROMPT_CHARS:,}"
    if problem:
        raise MlflowException(problem, error_code=INVALID_PARAMETER_VALUE)


class EditflowPyfunc:
    """pyfunc wrapper: completes each prompt greedily (``max_new_tokens`` param, default 8), within
    :data:`MAX_PROMPTS`, :data:`MAX_NEW_TOKENS` and :data:`MAX_PROMPT_CHARS`."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from editflow.generation import complete

        prompts = _prompts(model_input)
        n = int((params or {}).get("max_new_tokens", 8))
        check_serving_request(prompts, n)
        return complete(self.handle.model, self.handle.tokenizer, prompts, max_new_tokens=n)


def _prompts(model_input: Any) -> list[str]:
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[col]]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", next(iter(model_input.values())))
        return [value] if isinstance(value, str) else [str(x) for x in value]
    return [str(x) for x in model_input]


def _load_pyfunc(path: str) -> EditflowPyfunc:
    """pyfunc entry point (``loader_module``)."""
    return EditflowPyfunc(load_local(path))


def export_pretrained(handle: ModelHandle, out_dir: str | os.PathLike) -> None:
    """Write a plain ``save_pretrained`` directory (weights + tokenizer) of a loaded model."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    handle.model.save_pretrained(tmp, safe_serialization=True)
    handle.tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
    if out.exists():
        out.rmdir()
    shutil.move(str(tmp), str(out))
