"""Load Hugging Face causal LMs and describe where MEMIT edits them.

The architecture adapter is found from the model's own module structure (the list of transformer
blocks, the MLP output projection inside each, and whether a norm sits between that projection and
the residual stream), never from the model's name. Module paths can be overridden for architectures
the search does not know (:func:`with_module_overrides`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from editflow import nethook
from editflow.hashing import update_with_tensor

#: MLP output projections of known families, by attribute path inside one block.
#: GPT-2 ``mlp.c_proj`` (Conv1D), GPT-J ``mlp.fc_out``, GPT-NeoX ``mlp.dense_4h_to_h``,
#: Llama/Mistral/Qwen2/Qwen3/Gemma 2/Gemma 3/OLMo 2 ``mlp.down_proj``, Phi-3 ``mlp.down_proj`` (its
#: input projection is one fused ``gate_up_proj``; d_ff is read from ``down_proj``).
KNOWN_MLP_OUT = ("mlp.c_proj", "mlp.fc_out", "mlp.dense_4h_to_h", "mlp.down_proj")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class Adapter:
    """Where the edited pieces of one architecture live.

    ``layer_tmp`` and ``rewrite_tmp`` are module-name templates with one ``{}`` for the layer index.
    ``conv1d`` is true when the rewrite weight is stored (in_features, out_features) as GPT-2's Conv1D.
    ``post_mlp_norm_tmp`` names the RMS norm that normalises the rewrite module's output before it
    joins the residual stream (Gemma 2/3 and OLMo 2 ``post_feedforward_layernorm``); ``None`` for
    pre-norm blocks, where the output is added as it is.
    """

    layer_tmp: str
    rewrite_tmp: str
    n_layers: int
    d_model: int
    d_ff: int
    conv1d: bool
    model_type: str = "unknown"
    embed: str | None = None
    post_mlp_norm_tmp: str | None = None

    def layer(self, i: int) -> str:
        return self.layer_tmp.format(i)

    def rewrite(self, i: int) -> str:
        return self.rewrite_tmp.format(i)

    def rewrite_weight(self, i: int) -> str:
        return f"{self.rewrite(i)}.weight"

    def post_mlp_norm(self, i: int) -> str | None:
        return self.post_mlp_norm_tmp.format(i) if self.post_mlp_norm_tmp is not None else None


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
    candidates = [
        (name, len(mod)) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0
    ]
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


def _check_template(template: str, what: str) -> None:
    if template.count("{}") != 1:
        raise ValueError(f"{what} {template!r} must contain exactly one '{{}}' for the layer index")


def _module(model: nn.Module, name: str, what: str, template: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{what} {template!r}: the model has no module {name!r}") from None


def _count_layers(model: nn.Module, layer_tmp: str) -> int:
    """How many blocks ``layer_tmp`` names: indices 0, 1, … while the module exists."""
    n = 0
    while True:
        try:
            model.get_submodule(layer_tmp.format(n))
        except AttributeError:
            return n
        n += 1


def _check_rewrite_modules(model: nn.Module, layer_tmp: str, rewrite_tmp: str, n_layers: int) -> None:
    """Every layer's rewrite module exists inside its block and is a Linear/Conv1D of one shape."""
    shapes = set()
    for i in range(n_layers):
        name = rewrite_tmp.format(i)
        if not name.startswith(layer_tmp.format(i) + "."):
            raise ValueError(
                f"rewrite_tmp {rewrite_tmp!r} must name a module inside block "
                f"{layer_tmp.format(i)!r} (layer_tmp {layer_tmp!r})"
            )
        mod = _module(model, name, "rewrite_tmp", rewrite_tmp)
        if not _is_projection(mod):
            raise ValueError(
                f"rewrite_tmp {rewrite_tmp!r}: {name!r} is a {type(mod).__name__}, not a Linear or Conv1D projection"
            )
        shapes.add(_in_out(mod))
    if len(shapes) > 1:
        raise ValueError(f"rewrite_tmp {rewrite_tmp!r}: the modules differ in shape across layers {sorted(shapes)}")


def _input_of(args: tuple, kwargs: dict) -> object:
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))


def _is_scale_invariant(module: nn.Module, x: torch.Tensor) -> bool:
    """``module(2x) == module(x)``: what a normalisation does and a projection or activation does not."""
    y1, y2 = module(x).float(), module(2 * x).float()
    return bool(torch.allclose(y1, y2, rtol=2e-2, atol=1e-3 * float(y1.abs().max())))


def _is_rms_norm(module: nn.Module, x: torch.Tensor) -> bool:
    """``module(x) ∝ g ⊙ x / rms(x)`` with ``g = module(1)`` (no centring, no bias)."""
    g = module(torch.ones_like(x[..., :1, :])).float()
    xf = x.float()
    expect = g * xf / xf.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    y = module(x).float()
    return bool(torch.allclose(y, expect, rtol=2e-2, atol=1e-3 * float(y.abs().max())))


def _stop(*_args: object) -> None:
    raise nethook.StopForward


def _first_consumer(model: nn.Module, layer_tmp: str, rewrite_tmp: str) -> tuple[str, nn.Module, torch.Tensor] | None:
    """The first module of block 0 that takes the rewrite module's output as its input, skipping
    modules that pass it on unchanged (dropout in eval mode): ``(name in the block, module, input)``.

    Runs a few tokens through the model, stopped after block 0.
    """
    block_name = layer_tmp.format(0)
    block = model.get_submodule(block_name)
    flowing: list[torch.Tensor] = []  # the rewrite output and unchanged copies of it
    found: list[tuple[str, nn.Module, torch.Tensor]] = []

    def on_rewrite(_m: nn.Module, _a: tuple, out: object) -> None:
        flowing.append(nethook.first_tensor(out))

    def on_module(name: str):
        def fn(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            x = _input_of(args, kwargs)
            if found or not any(x is t for t in flowing):
                return
            y = nethook.first_tensor(out)
            if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.equal(y, x):
                flowing.append(y)
            else:
                found.append((name, mod, x))
                raise nethook.StopForward

        return fn

    handles = [model.get_submodule(rewrite_tmp.format(0)).register_forward_hook(on_rewrite)]
    handles += [m.register_forward_hook(on_module(n), with_kwargs=True) for n, m in block.named_modules() if n]
    handles.append(block.register_forward_hook(_stop))
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = 1 + (torch.arange(4, device=device) % max(vocab - 1, 1))[None]  # (1, 4); id 0 is often padding
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), nethook.hooks(handles):
            nethook.run_until_stopped(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(was_training)
    return found[0] if found else None


def _find_post_mlp_norm(model: nn.Module, layer_tmp: str, rewrite_tmp: str) -> str | None:
    """Template of the RMS norm applied to the rewrite output before the residual add, or ``None``.

    Read from what the model does, not its name: the first module of block 0 that consumes the
    rewrite module's output is a post-MLP norm if it is scale invariant; it must also have the RMS
    form ``g ⊙ x / rms(x)`` (the only one the engine can invert), otherwise a warning says the block
    is treated as pre-norm.
    """
    try:
        consumer = _first_consumer(model, layer_tmp, rewrite_tmp)
    except Exception as exc:  # a model that cannot run a few tokens on its own is treated as pre-norm
        warnings.warn(
            f"could not trace block 0 to look for a post-MLP norm ({exc}); treating it as pre-norm", stacklevel=3
        )
        return None
    if consumer is None:
        return None
    name, module, x = consumer
    with torch.no_grad():
        if not _is_scale_invariant(module, x):
            return None
        if not _is_rms_norm(module, x):
            warnings.warn(
                f"block output module {name!r} normalises the MLP output but is not an RMS norm; "
                "MEMIT treats the block as pre-norm",
                stacklevel=3,
            )
            return None
    return f"{layer_tmp}.{name}"


def detect_adapter(model: nn.Module, layer_tmp: str | None = None, rewrite_tmp: str | None = None) -> Adapter:
    """Describe ``model``'s blocks and rewrite modules from its structure (overrides win).

    ``layer_tmp``/``rewrite_tmp`` are module-name templates with one ``{}`` (``"model.layers.{}"``,
    ``"model.layers.{}.mlp.down_proj"``); they are checked: every block and rewrite module must exist
    and the rewrite modules must be Linear/Conv1D projections inside their blocks (``ValueError``).
    """
    config = getattr(model, "config", None)
    n_cfg = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if layer_tmp is None:
        layer_tmp = _find_block_list(model, n_cfg) + ".{}"
    _check_template(layer_tmp, "layer_tmp")
    block0 = _module(model, layer_tmp.format(0), "layer_tmp", layer_tmp)
    n_layers = _count_layers(model, layer_tmp)
    d_model = _hidden_size(config)
    if rewrite_tmp is None:
        if d_model is None:
            raise ValueError("model config has no hidden size; pass rewrite_tmp explicitly")
        rewrite_tmp = f"{layer_tmp}.{_find_mlp_out(block0, d_model)}"
    _check_template(rewrite_tmp, "rewrite_tmp")
    _check_rewrite_modules(model, layer_tmp, rewrite_tmp, n_layers)
    d_in, d_out, conv1d = _in_out(model.get_submodule(rewrite_tmp.format(0)))
    embed = None
    get_emb = getattr(model, "get_input_embeddings", None)
    if get_emb is not None:
        emb = get_emb()
        embed = next((n for n, m in model.named_modules() if m is emb), None)
    return Adapter(
        layer_tmp=layer_tmp,
        rewrite_tmp=rewrite_tmp,
        n_layers=n_layers,
        d_model=d_out,
        d_ff=d_in,
        conv1d=conv1d,
        model_type=str(getattr(config, "model_type", "unknown")),
        embed=embed,
        post_mlp_norm_tmp=_find_post_mlp_norm(model, layer_tmp, rewrite_tmp),
    )


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


def with_module_overrides(
    handle: ModelHandle, layer_tmp: str | None = None, rewrite_tmp: str | None = None
) -> ModelHandle:
    """``handle`` with its adapter re-detected under module-path overrides (``MemitConfig.layer_tmp``,
    ``MemitConfig.rewrite_tmp``); the same handle when both are ``None``.

    A template that names no module, or a rewrite module that is not a Linear/Conv1D projection
    inside its block, is a ``ValueError``.
    """
    if layer_tmp is None and rewrite_tmp is None:
        return handle
    if layer_tmp is None and rewrite_tmp is not None:
        layer_tmp = handle.adapter.layer_tmp
    return dataclasses.replace(handle, adapter=detect_adapter(handle.model, layer_tmp, rewrite_tmp))


def prepare_tokenizer(tokenizer: object) -> object:
    """Give the tokenizer a pad token (its EOS) when it has none; editflow pads on the right."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # type: ignore[attr-defined]
    tokenizer.padding_side = "right"  # type: ignore[attr-defined]
    return tokenizer


def is_local(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).expanduser().exists()


def load_model(
    name_or_path: str | os.PathLike,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    layer_tmp: str | None = None,
    rewrite_tmp: str | None = None,
) -> ModelHandle:
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
    tokenizer = prepare_tokenizer(
        AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k == "local_files_only"})
    )
    model.to(device or default_device()).eval()
    return ModelHandle(
        model=model,
        tokenizer=tokenizer,
        adapter=detect_adapter(model, layer_tmp, rewrite_tmp),
        source=source,
        extra={"model_defaults": read_model_defaults(source)},
    )


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
        update_with_tensor(h, name, state[name])
    return h.hexdigest()
