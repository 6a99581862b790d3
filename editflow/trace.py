"""Causal tracing (Meng et al. 2022, ROME §2): where in the network does a model recall a fact?

Corrupt the subject's token embeddings with Gaussian noise, then restore the clean value of one
hidden state (a block output at one layer and position, or the rewrite-module output, i.e. the MLP's
contribution, of a window of layers at the subject's last token) and measure how much of the
probability of the fact's object's first token comes back. Restore runs for one layer are batched
(positions × noise samples in one forward). Module paths come from the :class:`~editflow.models.Adapter`
and every hook from :mod:`editflow.nethook`. Pure computation: no files, no plots (see
``editflow.commands.trace``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from editflow import nethook, progress
from editflow.models import Adapter, detect_adapter
from editflow.requests import EditRequest, parse_record
from editflow.tokens import encode, encode_target

#: Position buckets used to average traces over prompts of different lengths (as in ROME).
BUCKETS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


@dataclass
class TraceResult:
    """Trace of one prompt. ``hidden[l, t]``: P(target) with block ``l``'s output at position ``t``
    restored; ``mlp[l]``: with the rewrite-module (MLP) outputs of the window around ``l`` restored at
    the last subject token. ``p_clean``/``p_corrupt``: without corruption / corrupted, nothing restored.
    ``hidden`` is None when only the MLP effects were traced."""

    prompt: str
    subject: str
    target: str
    tokens: list[str]
    subject_range: tuple[int, int]
    p_clean: float
    p_corrupt: float
    hidden: np.ndarray | None  # (L, T)
    mlp: np.ndarray  # (L,)


# --------------------------------------------------------------------------- inputs


def subject_span(tok: object, prompt: str, subject: str) -> tuple[int, int]:
    """Token range [a, b) of the subject in ``prompt.format(subject)``, from prefix tokenisation boundaries."""
    prefix = prompt[: prompt.index("{}")]
    # a trailing space belongs to the subject's first token (GPT-2 style "ĠName")
    return len(encode(tok, prefix.rstrip())), len(encode(tok, prefix + subject))


def embedding_std(model: nn.Module) -> float:
    """Standard deviation of the token-embedding matrix entries."""
    return model.get_input_embeddings().weight.detach().float().std().item()


def window_users(n_layers: int, window: int) -> list[list[int]]:
    """``users[j]``: the rows ``l`` whose window of ``window`` MLP layers around ``l`` contains layer ``j``."""
    half = window // 2
    return [[l for l in range(n_layers) if abs(j - l) <= half and j - l < window - half] for j in range(n_layers)]


# --------------------------------------------------------------------------- hooks


def _set_rows(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h -> h`` with ``h[rows, cols] = values`` (a copy)."""

    def fn(h: torch.Tensor) -> torch.Tensor:  # h: (B, T, D)
        out = h.clone()
        out[rows, cols] = values.to(out.dtype)
        return out

    return fn


def _add_noise(span: tuple[int, int], noise: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h -> h`` with ``noise[r % S]`` added to row r over the subject span (noise: (S, span, D))."""
    s0, s1 = span

    def fn(h: torch.Tensor) -> torch.Tensor:  # h: (B, T, D), B a multiple of S
        out = h.clone()
        out[:, s0:s1] += noise.repeat(h.shape[0] // noise.shape[0], 1, 1).to(out.dtype)
        return out

    return fn


def _embed_name(adapter: Adapter) -> str:
    if adapter.embed is None:
        raise ValueError("the model's input embedding module was not found; causal tracing needs it")
    return adapter.embed


@torch.no_grad()
def _probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token distribution after the last position of each row: (B, V) float32."""
    return torch.softmax(model(input_ids=ids).logits[:, -1].float(), -1)


# --------------------------------------------------------------------------- one prompt


def _clean_states(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """Clean next-token probabilities (V,) and every block output and rewrite output, {l: (T, D)}."""
    blocks = [adapter.layer(l) for l in range(adapter.n_layers)]
    rewrites = [adapter.rewrite(l) for l in range(adapter.n_layers)]
    with nethook.capture(model, outputs_of=blocks + rewrites, transform=lambda _n, t: t[0].detach().clone()) as got:
        probs = _probs(model, ids)[0]
    return probs, {l: got[n] for l, n in enumerate(blocks)}, {l: got[n] for l, n in enumerate(rewrites)}


def _restore_hidden(
    model: nn.Module, adapter: Adapter, ids: torch.Tensor, target: int, clean: dict, samples: int
) -> np.ndarray:
    """(L, T): P(target) with block l's clean output restored at position t, mean over noise samples."""
    T, device = ids.shape[1], ids.device
    pos = torch.arange(T, device=device).repeat_interleave(samples)  # (T·S,) position of each row
    rows = torch.arange(T * samples, device=device)
    hidden = np.zeros((adapter.n_layers, T))
    for layer in range(adapter.n_layers):
        with nethook.patch_output(model, adapter.layer(layer), _set_rows(rows, pos, clean[layer][pos])):
            p = _probs(model, ids.expand(T * samples, -1))[:, target]  # (T·S,)
        hidden[layer] = p.view(T, samples).mean(1).cpu().numpy()
    return hidden


def _restore_mlp(
    model: nn.Module,
    adapter: Adapter,
    ids: torch.Tensor,
    target: int,
    clean: dict,
    last: int,
    samples: int,
    window: int,
) -> np.ndarray:
    """(L,): P(target) with the rewrite outputs of the window around l restored at ``last`` (one forward)."""
    L, device = adapter.n_layers, ids.device
    with contextlib.ExitStack() as stack:
        for j, users in enumerate(window_users(L, window)):  # row block l restores layer j when j ∈ window(l)
            if users:
                r = torch.cat([torch.arange(l * samples, (l + 1) * samples) for l in users]).to(device)
                c = torch.full_like(r, last)
                stack.enter_context(
                    nethook.patch_output(model, adapter.rewrite(j), _set_rows(r, c, clean[j][last].expand(len(r), -1)))
                )
        p = _probs(model, ids.expand(L * samples, -1))[:, target]  # (L·S,)
    return p.view(L, samples).mean(1).cpu().numpy()


@torch.no_grad()
def trace_prompt(
    model: nn.Module,
    tok: object,
    adapter: Adapter,
    prompt: str,
    subject: str,
    target: str | None,
    noise_std: float,
    samples: int = 10,
    window: int = 1,
    seed: int = 0,
    hidden_states: bool = True,
) -> TraceResult:
    """Trace one prompt (``prompt`` has one ``{}`` for ``subject``). ``target`` is scored with a leading
    space (its first token); ``None`` traces the clean model's own top-1 next token.
    ``hidden_states=False`` traces only the MLP effects (one forward instead of one per layer more)."""
    device = next(model.parameters()).device
    ids = torch.tensor([encode(tok, prompt.format(subject))], device=device)  # (1, T)
    span = subject_span(tok, prompt, subject)
    if not 0 <= span[0] < span[1] <= ids.shape[1]:
        raise ValueError(f"subject {subject!r} has no tokens in {prompt!r}")
    p_clean_all, clean_h, clean_m = _clean_states(model, adapter, ids)
    target_ids = encode_target(tok, target) if target else [int(p_clean_all.argmax())]
    if not target_ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    t_id = target_ids[0]

    g = torch.Generator().manual_seed(seed)
    d_emb = model.get_input_embeddings().embedding_dim
    noise = (torch.randn(samples, span[1] - span[0], d_emb, generator=g) * noise_std).to(device)  # (S, span, D)
    with nethook.patch_output(model, _embed_name(adapter), _add_noise(span, noise)):
        p_corrupt = _probs(model, ids.expand(samples, -1))[:, t_id].mean().item()
        hidden = _restore_hidden(model, adapter, ids, t_id, clean_h, samples) if hidden_states else None
        mlp = _restore_mlp(model, adapter, ids, t_id, clean_m, span[1] - 1, samples, window)

    return TraceResult(
        prompt=prompt,
        subject=subject,
        target=target or tok.decode([t_id]).strip(),
        tokens=tok.convert_ids_to_tokens(ids[0].tolist()),
        subject_range=span,
        p_clean=p_clean_all[t_id].item(),
        p_corrupt=p_corrupt,
        hidden=hidden,
        mlp=mlp,
    )


# --------------------------------------------------------------------------- averages


def bucketed(result: TraceResult) -> np.ndarray:
    """Indirect effects (restored − corrupted) averaged into the :data:`BUCKETS` (layers × 6, NaN when absent)."""
    s0, s1 = result.subject_range
    T = result.hidden.shape[1]
    groups = [
        [s0],
        list(range(s0 + 1, s1 - 1)),
        [s1 - 1],
        [s1] if s1 < T - 1 else [],
        list(range(s1 + 1, T - 1)),
        [T - 1],
    ]
    eff = result.hidden - result.p_corrupt
    return np.stack([eff[:, g].mean(1) if g else np.full(eff.shape[0], np.nan) for g in groups], 1)


@dataclass
class TraceSummary:
    """Averages over traced prompts (indirect effects are P(restored) − P(corrupted))."""

    n: int
    noise_std: float
    samples: int
    window: int
    p_clean: float
    p_corrupt: float
    buckets: list[str]
    hidden_effect: list[list[float]]  # layers × buckets
    mlp_effect: list[float]  # per layer, at the last subject token

    def best_mlp_layers(self, k: int = 3) -> list[int]:
        """The ``k`` consecutive layers with the largest MLP indirect effect (see :func:`best_window`)."""
        return list(best_window(self, k))

    def to_dict(self) -> dict:
        """JSON-ready fields plus the best 3-layer window."""
        return asdict(self) | {"best_mlp_layers_3": self.best_mlp_layers(3)}


def mlp_effects(trace: TraceSummary | TraceResult) -> np.ndarray:
    """Per-layer MLP indirect effect at the subject's last token: (L,)."""
    if isinstance(trace, TraceResult):
        return np.asarray(trace.mlp) - trace.p_corrupt
    return np.asarray(trace.mlp_effect, dtype=float)


def best_window(trace: TraceSummary | TraceResult, width: int) -> tuple[int, ...]:
    """The ``width`` consecutive MLP layers with the highest mean indirect effect at the subject's last
    token (``width`` is capped at the depth; ties go to the shallower window)."""
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    e = mlp_effects(trace)
    k = min(width, len(e))
    means = np.convolve(e, np.ones(k) / k, mode="valid")  # (L - k + 1,) mean over each window
    start = int(np.argmax(means))
    return tuple(range(start, start + k))


def summarise(results: Sequence[TraceResult], noise_std: float, samples: int, window: int) -> TraceSummary:
    """Average traces with positions aligned into :data:`BUCKETS` (no hidden effects when a trace has
    none)."""
    if not results:
        raise ValueError("no traces to summarise")
    with warnings.catch_warnings():  # a bucket no prompt has (e.g. one-token subjects) stays NaN -> 0
        warnings.simplefilter("ignore", RuntimeWarning)
        traced = all(r.hidden is not None for r in results)
        hid = np.nanmean(np.stack([bucketed(r) for r in results]), 0) if traced else np.zeros((0, len(BUCKETS)))
    mlp = np.mean([mlp_effects(r) for r in results], 0)
    return TraceSummary(
        n=len(results),
        noise_std=noise_std,
        samples=samples,
        window=window,
        p_clean=float(np.mean([r.p_clean for r in results])),
        p_corrupt=float(np.mean([r.p_corrupt for r in results])),
        buckets=list(BUCKETS),
        hidden_effect=np.nan_to_num(hid).tolist(),
        mlp_effect=mlp.tolist(),
    )


# --------------------------------------------------------------------------- many requests


def trace_requests(
    model: nn.Module,
    tok: object,
    requests: Sequence[EditRequest],
    adapter: Adapter | None = None,
    noise: float = 3.0,
    samples: int = 10,
    window: int = 1,
    seed: int = 0,
    hidden_states: bool = True,
) -> tuple[list[TraceResult], TraceSummary]:
    """Trace each request's prompt towards its true object (``target_true``; the model's own top-1 answer
    when a request has none). ``noise`` is the noise std as a multiple of the embedding std;
    ``hidden_states=False``: MLP effects only (:func:`trace_prompt`)."""
    adapter = adapter or detect_adapter(model)
    std = noise * embedding_std(model)
    results = [
        trace_prompt(
            model, tok, adapter, r.prompt, r.subject, r.target_true, std, samples, window, seed + i, hidden_states
        )
        for i, r in enumerate(progress.track(requests, desc="trace", unit="prompt"))
    ]
    return results, summarise(results, std, samples, window)


def trace_records(
    model: nn.Module,
    tok: object,
    records: Sequence[dict | EditRequest],
    noise: float = 3.0,
    samples: int = 10,
    window: int = 1,
    seed: int = 0,
) -> tuple[list[TraceResult], TraceSummary]:
    """:func:`trace_requests` for raw records of any request format (or :class:`EditRequest` objects)."""
    requests = [r if isinstance(r, EditRequest) else parse_record(r, i) for i, r in enumerate(records)]
    return trace_requests(model, tok, requests, noise=noise, samples=samples, window=window, seed=seed)
