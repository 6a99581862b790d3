"""Load Hugging Face causal LMs and describe where MEMIT edits them.

The architecture adapter is found from the model's own module structure (the list of transformer
blocks and the MLP output projection inside each), never from the model's name. Module paths can be
overridden for architectures the search does not know.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

#: MLP output projections of known families, by attribute path inside one block.
#: GPT-2 ``mlp.c_proj`` (Conv1D), GPT-J ``mlp.fc_out``, GPT-NeoX ``mlp.dense_4h_to_h``,
#: Llama/Mistral/Qwen2 ``mlp.down_proj``.
KNOWN_MLP_OUT = ("mlp.c_proj", "mlp.fc_out", "mlp.dense_4h_to_h", "mlp.down_proj")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Adapter:
    """Where the edited pieces of one architecture live.

    ``layer_tmp`` and ``rewrite_tmp`` are module-name templates with one ``{}`` for the layer index.
    ``conv1d`` is true when the rewrite weight is stored (in_features, out_features) as GPT-2's Conv1D.
    """

    layer_tmp: str
    rewrite_tmp: str
    n_layers: int
    d_model: int
    d_ff: int
    conv1d: bool
    model_type: str = "unknown"
    embed: str | None = None

    def layer(self, i: int) -> str:
        return self.layer_tmp.format(i)

    def rewrite(self, i: int) -> str:
        return self.rewrite_tmp.format(i)

    def rewrite_weight(self, i: int) -> str:
        return f"{self.rewrite(i)}.weight"


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_out(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, is_conv1d) of a Linear or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    w = module.weight  # Conv1D stores (in, out)
    return int(w.shape[0]), int(w.shape[1]), True


def _find_block_list(model: nn.Module, n_layers: int | None) -> str:
    """Name of the ModuleList holding the transformer blocks (the longest one, matching the config)."""
    candidates = [(name, len(mod)) for name, mod in model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    if n_layers is not None:
        matching = [c for c in candidates if c[1] == n_layers]
        candidates = matching or candidates
    if not candidates:
        raise ValueError("could not find the list of transformer blocks; pass layer_tmp explicitly")
    return max(candidates, key=lambda c: (c[1], -c[0].count(".")))[0]


def _find_mlp_out(block: nn.Module, d_model: int) -> str:
    """Attribute path of the MLP output projection inside one block."""
    for path in KNOWN_MLP_OUT:
        try:
            if _is_projection(block.get_submodule(path)):
                return path
        except AttributeError:
            continue
    # Fallback by shape: a projection under an "mlp"/"feed_forward" child mapping d_ff -> d_model.
    for name, mod in block.named_modules():
        if _is_projection(mod) and any(p in name for p in ("mlp", "ffn", "feed_forward")):
            d_in, d_out, _ = _in_out(mod)
            if d_out == d_model and d_in > d_model:
                return name
    raise ValueError("could not find the MLP output projection; pass rewrite_tmp explicitly")


def _hidden_size(config: object) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def detect_adapter(model: nn.Module, layer_tmp: str | None = None,
                   rewrite_tmp: str | None = None) -> Adapter:
    """Describe ``model``'s blocks and rewrite modules from its structure (overrides win)."""
    config = getattr(model, "config", None)
    n_cfg = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if layer_tmp is None:
        layer_tmp = _find_block_list(model, n_cfg) + ".{}"
    blocks = model.get_submodule(layer_tmp.format("").rstrip("."))
    n_layers = len(blocks) if isinstance(blocks, nn.ModuleList) else int(n_cfg)
    block0 = model.get_submodule(layer_tmp.format(0))
    d_model = _hidden_size(config)
    if rewrite_tmp is None:
        if d_model is None:
            raise ValueError("model config has no hidden size; pass rewrite_tmp explicitly")
        rewrite_tmp = f"{layer_tmp}.{_find_mlp_out(block0, d_model)}"
    d_in, d_out, conv1d = _in_out(model.get_submodule(rewrite_tmp.format(0)))
    embed = None
    get_emb = getattr(model, "get_input_embeddings", None)
    if get_emb is not None:
        emb = get_emb()
        embed = next((n for n, m in model.named_modules() if m is emb), None)
    return Adapter(layer_tmp=layer_tmp, rewrite_tmp=rewrite_tmp, n_layers=n_layers,
                   d_model=d_out, d_ff=d_in, conv1d=conv1d,
                   model_type=str(getattr(config, "model_type", "unknown")), embed=embed)


def default_device() -> str:
    """``cuda`` when available, else ``cpu``; ``EDITFLOW_DEVICE`` overrides."""
    return os.environ.get("EDITFLOW_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


@dataclass
class ModelHandle:
    """A loaded model with its tokenizer and adapter."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def prepare_tokenizer(tokenizer: object) -> object:
    """Give the tokenizer a pad token (its EOS) when it has none; editflow pads on the right."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # type: ignore[attr-defined]
    tokenizer.padding_side = "right"  # type: ignore[attr-defined]
    return tokenizer


def is_local(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).expanduser().exists()


def load_model(name_or_path: str | os.PathLike, device: str | None = None,
               dtype: str | torch.dtype | None = None, layer_tmp: str | None = None,
               rewrite_tmp: str | None = None) -> ModelHandle:
    """Load a causal LM and its tokenizer from a local directory or a Hugging Face hub id.

    Local paths never touch the network. A hub id is fetched only when ``HF_HUB_OFFLINE`` is not set.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(name_or_path)
    kwargs: dict = {}
    if is_local(source):
        source = str(Path(source).expanduser().resolve())
        kwargs["local_files_only"] = True
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source, **{
        k: v for k, v in kwargs.items() if k == "local_files_only"}))
    model.to(device or default_device()).eval()
    return ModelHandle(model=model, tokenizer=tokenizer,
                       adapter=detect_adapter(model, layer_tmp, rewrite_tmp), source=source,
                       extra={"model_defaults": read_model_defaults(source)})


def read_model_defaults(model_dir: str | os.PathLike) -> dict:
    """What a model directory recommends for editing it (``editflow.json``: hparams, stats_tokens)."""
    path = Path(model_dir) / "editflow.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def fingerprint(model: nn.Module, names: list[str] | None = None) -> str:
    """SHA-256 over the named parameters (all when ``names`` is None), their names, shapes and dtypes.

    Statistics for layer ℓ depend only on parameters up to layer ℓ, but hashing all of them is cheap
    and safe; callers may pass the subset they depend on.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(names if names is not None else state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
