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

from editflow.models import ModelHandle, load_model as load_hf_model

FLAVOR_NAME = "editflow"
META_FILE = "editflow.json"
WEIGHTS_DIR = "weights"
EDITED_FILE = "edited.safetensors"


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    def pin(pkg: str) -> str:
        try:
            return f"{pkg}=={version(pkg)}"
        except Exception:
            return pkg

    return [pin(p) for p in ("editflow", "torch", "transformers", "safetensors", "mlflow")]


def save_model(path: str | os.PathLike, handle: ModelHandle, *, storage: str = "full",
               edited_tensors: list[str] | None = None, lineage: dict[str, Any] | None = None,
               mlflow_model: Any = None, **_: Any) -> None:
    """Write ``handle``'s model to ``path`` as an editflow model directory with an MLmodel file.

    ``storage="delta"`` keeps only ``edited_tensors`` (every tensor that differs from the root base:
    the rewrite weights edited anywhere in the lineage); ``lineage`` must then carry
    ``base_artifact_uri`` (and ideally ``base_model_uri``).
    """
    from mlflow.models import Model, ModelSignature
    from mlflow.pyfunc import add_to_model
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.utils.environment import _mlflow_conda_env, _PythonEnv

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"storage": storage, **(lineage or {})}
    if storage == "full":
        handle.model.save_pretrained(path / WEIGHTS_DIR, safe_serialization=True)
        handle.tokenizer.save_pretrained(path / WEIGHTS_DIR)  # type: ignore[attr-defined]
    elif storage == "delta":
        if not edited_tensors or not meta.get("base_artifact_uri"):
            raise ValueError("delta storage needs the edited tensor names and the base's artifact URI")
        from safetensors.torch import save_file

        state = handle.model.state_dict()
        save_file({k: state[k].detach().contiguous().cpu() for k in edited_tensors}, str(path / EDITED_FILE))
        meta["edited_tensors"] = sorted(edited_tensors)
    else:
        raise ValueError(f"storage must be 'full' or 'delta', got {storage!r}")
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    mlflow_model = mlflow_model or Model()
    mlflow_model.signature = ModelSignature(
        inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 8)]))
    mlflow_model.add_flavor(FLAVOR_NAME, storage=storage, model_type=handle.adapter.model_type)
    add_to_model(mlflow_model, loader_module="editflow.registry.flavor", env={"conda": "conda.yaml",
                                                                            "virtualenv": "python_env.yaml"})
    reqs = _pip_requirements()
    (path / "requirements.txt").write_text("\n".join(reqs) + "\n")
    import yaml

    (path / "conda.yaml").write_text(yaml.safe_dump(_mlflow_conda_env(additional_pip_deps=reqs)))
    _PythonEnv.current().to_yaml(path / "python_env.yaml")
    mlflow_model.save(str(path / "MLmodel"))


def read_tensors(model_uri: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Selected tensors of a full-storage model, read from its safetensors without loading the model
    (a local artifact store is read in place; a remote one downloads only ``weights/``)."""
    from urllib.parse import unquote, urlparse

    from safetensors import safe_open

    parsed = urlparse(model_uri)
    if parsed.scheme in ("", "file") and Path(unquote(parsed.path)).is_dir():
        weights = Path(unquote(parsed.path)) / WEIGHTS_DIR
        tmp = None
    else:
        tmp = tempfile.mkdtemp(prefix="editflow-weights-")
        weights = Path(download(model_uri.rstrip("/") + "/" + WEIGHTS_DIR, tmp))
    try:
        index = weights / "model.safetensors.index.json"
        shard_of = (json.loads(index.read_text())["weight_map"] if index.is_file()
                    else {n: "model.safetensors" for n in names})
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


def download(model_uri: str, dst: str | None = None) -> str:
    """A local directory with the model at ``model_uri`` (a local path is used as is)."""
    if Path(model_uri).is_dir():
        return str(model_uri)
    import mlflow

    from editflow.registry.store import configure

    configure()
    return mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst)


def load_local(local_dir: str | os.PathLike, device: str | None = None, dtype: str | None = None) -> ModelHandle:
    """Load an editflow model directory, reconstructing delta versions over their base."""
    local_dir = Path(local_dir)
    meta = read_meta(local_dir)
    if meta["storage"] == "full":
        handle = load_hf_model(local_dir / WEIGHTS_DIR, device=device, dtype=dtype)
    else:
        from safetensors.torch import load_file

        handle = load_model(meta["base_artifact_uri"], device=device, dtype=dtype,
                            fallback_uri=meta.get("base_model_uri"))
        edited = load_file(str(local_dir / EDITED_FILE))
        params = dict(handle.model.state_dict())
        with torch.no_grad():
            for name, tensor in edited.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    handle.extra["editflow"] = meta
    handle.extra["model_defaults"] = meta.get("model_defaults") or handle.extra.get("model_defaults", {})
    return handle


def load_model(model_uri: str, device: str | None = None, dtype: str | None = None,
               fallback_uri: str | None = None) -> ModelHandle:
    """Load an editflow model from any MLflow URI (``models:/NAME/3``, ``runs:/...``, a file URI)."""
    with tempfile.TemporaryDirectory(prefix="editflow-model-") as tmp:
        try:
            local = download(model_uri, tmp)
        except Exception:
            if fallback_uri is None:
                raise
            local = download(fallback_uri, tmp)
        return load_local(local, device=device, dtype=dtype)


class EditflowPyfunc:
    """pyfunc wrapper: completes each prompt greedily (``max_new_tokens`` param, default 8)."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from editflow.generation import complete

        prompts = _prompts(model_input)
        n = int((params or {}).get("max_new_tokens", 8))
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
