"""MEMIT/AlphaEdit hyperparameters: a typed config with per-architecture published defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_type_hints

Algorithm = Literal["memit", "alphaedit"]
Mode = Literal["batch", "sequential"]


@dataclass(frozen=True)
class MemitConfig:
    """Hyperparameters, named as in the public MEMIT code (defaults: GPT-J, the paper's main model).

    ``layers`` are the edited MLP layers, ascending. ``mom2_update_weight`` is λ, the weight of the
    key covariance C in MEMIT's solve. AlphaEdit uses ``nullspace_threshold`` and ``alphaedit_l2`` (α)
    instead of λ; ``nullspace_energy`` > 0 replaces the absolute threshold by a share of C's trace.
    ``preserve_edits`` makes MEMIT preserve the keys of earlier edits too (chunks and
    lineage versions: λC + K_p K_pᵀ + K Kᵀ; AlphaEdit always does); ``state_dtype`` is how the
    lineage's K_p K_pᵀ is stored. ``context_templates`` is the number of prefixed templates (the
    original samples 5 ten-token continuations of "The", "Therefore", "Because", "I", "You").
    ``repair_steps`` > 0 follows each solve with that many Adam steps on the edited matrices
    (:mod:`editflow.repair`, learning rate ``repair_lr``): the batch's target NLL plus ``repair_kl`` ·
    KL(parent ‖ model) on statistics-corpus documents plus ``repair_preserve`` · the change of the
    output on the lineage's earlier keys plus ``repair_replay`` · the target NLL of the facts the
    lineage already holds (0: none) plus ``repair_anchor`` · KL(parent ‖ model) of the next token
    after the batch's attribute prompts (CounterFact's prompts of other subjects with the same
    relations; 0: none). Not in the published algorithms; 0 (off) is plain MEMIT.
    ``layer_tmp``/``rewrite_tmp`` override where the blocks and the rewrite modules are (module-name
    templates with one ``{}``, e.g. ``"model.layers.{}.mlp.down_proj"``); the adapter that edits with
    them comes from ``editflow.models.with_module_overrides``.
    """

    layers: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    algorithm: Algorithm = "memit"
    mode: Mode = "batch"
    chunk_size: int = 100
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_early_stop_loss: float = 0.05
    mom2_update_weight: float = 15000.0
    mom2_dtype: str = "float32"
    nullspace_threshold: float = 2e-2
    nullspace_energy: float = 0.0
    alphaedit_l2: float = 10.0
    preserve_edits: bool = False
    state_dtype: str = "float32"
    context_templates: int = 5
    context_template_length: int = 10
    repair_steps: int = 0
    repair_lr: float = 1e-3
    repair_kl: float = 1.0
    repair_preserve: float = 1.0
    repair_replay: float = 0.0
    repair_anchor: float = 0.0
    seed: int = 0
    layer_tmp: str | None = None
    rewrite_tmp: str | None = None

    def __post_init__(self) -> None:
        layers = tuple(int(x) for x in self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be a non-empty ascending list without repeats, got {list(layers)}")
        for name, kind in (("algorithm", Algorithm), ("mode", Mode)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {get_args(kind)}, got {getattr(self, name)!r}")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if self.v_num_grad_steps < 1:
            raise ValueError("v_num_grad_steps must be >= 1")
        if self.repair_steps < 0:
            raise ValueError("repair_steps must be >= 0")
        if self.repair_lr <= 0 or min(self.repair_kl, self.repair_preserve, self.repair_replay, self.repair_anchor) < 0:
            raise ValueError("repair_lr must be > 0, repair_kl, repair_preserve, repair_replay and repair_anchor >= 0")
        if not 0.0 <= self.nullspace_energy < 1.0:
            raise ValueError(f"nullspace_energy must be in [0, 1), got {self.nullspace_energy}")
        if self.mom2_dtype not in ("float32", "float64"):
            raise ValueError("mom2_dtype must be float32 or float64")
        if self.state_dtype not in ("float32", "float64"):
            raise ValueError("state_dtype must be float32 or float64")
        for name in ("layer_tmp", "rewrite_tmp"):
            template = getattr(self, name)
            if template is not None and template.count("{}") != 1:
                raise ValueError(f"{name} must contain exactly one '{{}}' for the layer index, got {template!r}")

    def replace(self, **overrides: Any) -> "MemitConfig":
        """A copy with ``overrides`` applied (unknown keys are an error; strings are coerced)."""
        return MemitConfig.from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown}; known: {sorted(known)}")
        hints = get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in data.items()})


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Accept strings from the command line for typed fields ("13,14" for layers, "1e4" for floats)."""
    if not isinstance(value, str):
        return value
    try:
        if name == "layers":
            return tuple(parse_layers(value))
        if hint is int or hint == (int | None):
            return None if value.lower() in ("", "none") else int(value)
        if hint is float:
            return float(value)
        if hint is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if hint == (str | None) and value.lower() in ("", "none"):
            return None
    except ValueError:
        raise ValueError(f"hyperparameter {name}: cannot read {value!r}") from None
    return value


def parse_layers(text: str) -> list[int]:
    """Parse ``"3,4,5"``, ``"3-8"`` or ``"[3, 4]"`` into a list of layer indices."""
    text = text.strip().strip("[]")
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


#: Published settings: (reference depth, edited layers, overrides). GPT-2 XL and GPT-J from the MEMIT
#: code's hparams, Llama from EasyEdit's MEMIT llama-7b file. Other families map to the nearest.
PUBLISHED: dict[str, tuple[int, tuple[int, ...], dict[str, Any]]] = {
    "gpt2-xl": (48, (13, 14, 15, 16, 17), dict(mom2_update_weight=20000.0, v_num_grad_steps=20)),
    "gpt-j": (28, (3, 4, 5, 6, 7, 8), dict(mom2_update_weight=15000.0, v_num_grad_steps=25)),
    "llama": (
        32,
        (4, 5, 6, 7, 8),
        dict(mom2_update_weight=15000.0, v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0),
    ),
}
#: Gemma 2/3, Qwen 3, Phi-3 and OLMo 2 are Llama-style decoders (RMSNorm, gated MLP, rotary) with no
#: published MEMIT settings of their own: they take Llama's.
FAMILY_OF_MODEL_TYPE = {
    "gpt2": "gpt2-xl",
    "gptj": "gpt-j",
    "gpt_neox": "gpt-j",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma2": "llama",
    "gemma3_text": "llama",
    "gemma3": "llama",
    "phi3": "llama",
    "olmo2": "llama",
}


def scaled_layers(ref_depth: int, ref_layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Map a published layer range to a model of another depth, keeping relative position and count."""
    if depth == ref_depth:
        return ref_layers
    count = min(len(ref_layers), depth)
    start = round(ref_layers[0] * depth / ref_depth)
    start = max(0, min(start, depth - count))
    return tuple(range(start, start + count))


def default_config(
    model_type: str, n_layers: int, model_defaults: dict[str, Any] | None = None, **overrides: Any
) -> MemitConfig:
    """Published defaults for this architecture family, layers scaled to ``n_layers``.

    ``model_defaults`` (e.g. shipped with a model in ``editflow.json``) override the family defaults;
    ``overrides`` override everything.
    """
    family = FAMILY_OF_MODEL_TYPE.get(model_type, "gpt-j")
    ref_depth, ref_layers, extra = PUBLISHED[family]
    base = MemitConfig(layers=scaled_layers(ref_depth, ref_layers, n_layers), **extra)
    return base.replace(**{**(model_defaults or {}), **overrides})
