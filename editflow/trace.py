"""Causal tracing (Meng et al. 2022, ROME §2): where in the network does a model recall a fact?

Corrupt the subject's token embeddings with Gaussian noise, then restore the clean value of one
hidden state (a block output at one layer and position, or the MLP output of a window of layers at
the subject's last token) and measure how much of the probability of the true object's first token
comes back. Restore runs for one layer are batched (positions × noise samples in one forward).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

#: Position buckets used to average traces over prompts of different lengths (as in ROME).
BUCKETS = ("first subject token", "middle subject tokens", "last subject token",
           "first subsequent token", "further tokens", "last token")


@dataclass
class TraceResult:
    """Trace of one prompt. ``hidden[l, t]``: P(target) with block ``l``'s output at position ``t``
    restored; ``mlp[l]``: with the MLP outputs of the window around ``l`` restored at the last
    subject token. ``p_clean``/``p_corrupt``: without corruption / corrupted with nothing restored."""

    prompt: str
    subject: str
    target: str
    tokens: list[str]
    subject_range: tuple[int, int]
    p_clean: float
    p_corrupt: float
    hidden: np.ndarray
    mlp: np.ndarray


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer block list: the ModuleList whose length is the number of layers."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError("cannot find the transformer block list")


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: object, t: torch.Tensor) -> object:
    return (t, *output[1:]) if isinstance(output, tuple) else t


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _patch(module: nn.Module, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor):
    """Forward hook setting ``output[rows, cols] = values``."""
    def hook(_m, _a, output):
        t = _first(output).clone()
        t[rows, cols] = values.to(t.dtype)
        return _replace_first(output, t)
    return module.register_forward_hook(hook)


def _add_noise(module: nn.Module, span: tuple[int, int], noise: torch.Tensor):
    """Forward hook adding ``noise[r % S]`` to the embedding output of row r over the subject span."""
    s0, s1 = span

    def hook(_m, _a, output):
        t = output.clone()
        reps = t.shape[0] // noise.shape[0]
        t[:, s0:s1] += noise.repeat(reps, 1, 1).to(t.dtype)
        return t
    return module.register_forward_hook(hook)


def subject_span(tok, prompt: str, subject: str) -> tuple[int, int]:
    """Token range of the subject in ``prompt.format(subject)``, from prefix tokenisation boundaries."""
    i = prompt.index("{}")
    prefix = prompt[:i]
    # a trailing space belongs to the subject's first token (GPT-2 style "ĠName")
    a = len(tok(prefix.rstrip(), add_special_tokens=False)["input_ids"]) if prefix.strip() else 0
    b = len(tok(prefix + subject, add_special_tokens=False)["input_ids"])
    return a, b


def embedding_std(model: nn.Module) -> float:
    """Standard deviation of the token-embedding matrix entries."""
    return model.get_input_embeddings().weight.detach().float().std().item()


@torch.no_grad()
def _target_prob(model: nn.Module, ids: torch.Tensor, target: int) -> torch.Tensor:
    return torch.softmax(model(input_ids=ids).logits[:, -1].float(), -1)[:, target]


@torch.no_grad()
def trace_prompt(model: nn.Module, tok, prompt: str, subject: str, target: str, noise_std: float,
                 samples: int = 10, window: int = 1, seed: int = 0) -> TraceResult:
    """Trace one prompt (``prompt`` has one ``{}`` for ``subject``; ``target`` is scored with a leading space)."""
    text = prompt.format(subject)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], device=next(model.parameters()).device)
    t_id = tok(" " + target, add_special_tokens=False)["input_ids"][0]
    span = subject_span(tok, prompt, subject)
    blocks, emb = _blocks(model), model.get_input_embeddings()
    L, T, last = len(blocks), ids.shape[1], span[1] - 1

    clean_h, clean_m = [None] * L, [None] * L
    def keep(store, i):
        def hook(_m, _a, out):
            store[i] = _first(out)[0].detach().clone()
        return hook
    handles = [b.register_forward_hook(keep(clean_h, i)) for i, b in enumerate(blocks)]
    handles += [b.mlp.register_forward_hook(keep(clean_m, i)) for i, b in enumerate(blocks)]
    with _hooks(handles):
        p_clean = _target_prob(model, ids, t_id).item()

    g = torch.Generator().manual_seed(seed)
    noise = (torch.randn(samples, span[1] - span[0], emb.embedding_dim, generator=g) * noise_std).to(ids.device)
    with _hooks([_add_noise(emb, span, noise)]):
        p_corrupt = _target_prob(model, ids.expand(samples, -1), t_id).mean().item()

        hidden = np.zeros((L, T))
        pos = torch.arange(T, device=ids.device).repeat_interleave(samples)
        rows = torch.arange(T * samples, device=ids.device)
        for layer in range(L):
            with _hooks([_patch(blocks[layer], rows, pos, clean_h[layer][pos])]):
                p = _target_prob(model, ids.expand(T * samples, -1), t_id)
            hidden[layer] = p.view(T, samples).mean(1).cpu().numpy()

        handles = []
        for j in range(L):  # row block l restores MLP j when j is in the window around l
            users = [l for l in range(L) if abs(j - l) <= window // 2 and j - l < window - window // 2]
            if users:
                r = torch.cat([torch.arange(l * samples, (l + 1) * samples) for l in users]).to(ids.device)
                c = torch.full_like(r, last)
                handles.append(_patch(blocks[j].mlp, r, c, clean_m[j][last].expand(len(r), -1)))
        with _hooks(handles):
            mlp = _target_prob(model, ids.expand(L * samples, -1), t_id).view(L, samples).mean(1).cpu().numpy()

    return TraceResult(prompt=prompt, subject=subject, target=target,
                       tokens=tok.convert_ids_to_tokens(ids[0].tolist()), subject_range=span,
                       p_clean=p_clean, p_corrupt=p_corrupt, hidden=hidden, mlp=mlp)


def bucketed(result: TraceResult) -> np.ndarray:
    """Indirect effects (restored − corrupted) averaged into the :data:`BUCKETS` (layers × 6, NaN when absent)."""
    s0, s1 = result.subject_range
    T = result.hidden.shape[1]
    groups = [[s0], list(range(s0 + 1, s1 - 1)), [s1 - 1], [s1] if s1 < T - 1 else [],
              list(range(s1 + 1, T - 1)), [T - 1]]
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
        """The ``k`` consecutive layers with the largest summed MLP indirect effect."""
        e = np.asarray(self.mlp_effect)
        k = min(k, len(e))
        start = int(np.argmax([e[i:i + k].sum() for i in range(len(e) - k + 1)]))
        return list(range(start, start + k))


def summarise(results: Sequence[TraceResult], noise_std: float, samples: int, window: int) -> TraceSummary:
    """Average traces with positions aligned into :data:`BUCKETS`."""
    hid = np.nanmean(np.stack([bucketed(r) for r in results]), 0)
    mlp = np.mean([r.mlp - r.p_corrupt for r in results], 0)
    return TraceSummary(n=len(results), noise_std=noise_std, samples=samples, window=window,
                        p_clean=float(np.mean([r.p_clean for r in results])),
                        p_corrupt=float(np.mean([r.p_corrupt for r in results])), buckets=list(BUCKETS),
                        hidden_effect=np.nan_to_num(hid).tolist(), mlp_effect=mlp.tolist())


def trace_records(model: nn.Module, tok, records: Sequence[dict], noise: float = 3.0, samples: int = 10,
                  window: int = 1, seed: int = 0) -> tuple[list[TraceResult], TraceSummary]:
    """Trace the rewrite prompt of each CounterFact record towards its true object."""
    std = noise * embedding_std(model)
    results = []
    for i, rec in enumerate(tqdm(records, desc="trace", mininterval=5)):
        rw = rec["requested_rewrite"]
        results.append(trace_prompt(model, tok, rw["prompt"], rw["subject"], rw["target_true"]["str"],
                                    std, samples, window, seed + i))
    return results, summarise(results, std, samples, window)


def plot_summary(summary: TraceSummary, path: str | Path) -> None:
    """Heat map of block-output indirect effects (positions × layers) and the MLP effect per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hid = np.asarray(summary.hidden_effect).T
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    im = a.imshow(hid, cmap="Purples", aspect="auto", vmin=0)
    a.set_yticks(range(len(summary.buckets)), summary.buckets)
    a.set_xlabel("layer")
    a.set_title(f"restored block output (n={summary.n})")
    fig.colorbar(im, ax=a, label="P(true) − P(corrupted)")
    b.bar(range(len(summary.mlp_effect)), summary.mlp_effect, color="tab:green")
    b.set_xlabel("layer")
    b.set_title(f"MLP at last subject token (window {summary.window})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(summary: TraceSummary) -> str:
    """Per-layer table: MLP effect and block-output effect at the last subject token and last token."""
    hid = np.asarray(summary.hidden_effect)
    lines = [f"clean P(true)={summary.p_clean:.3f}  corrupted={summary.p_corrupt:.3f}  n={summary.n}",
             "layer  mlp@last_subj  hidden@last_subj  hidden@last_token"]
    for l, m in enumerate(summary.mlp_effect):
        lines.append(f"{l:5d}  {m:13.4f}  {hid[l, 2]:16.4f}  {hid[l, 5]:17.4f}")
    return "\n".join(lines)


def save_summary(summary: TraceSummary, out_dir: str | Path) -> Path:
    """Write ``trace.json`` and ``trace.png`` into ``out_dir``; return the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = asdict(summary) | {"best_mlp_layers_3": summary.best_mlp_layers(3)}
    (out / "trace.json").write_text(json.dumps(data, indent=2) + "\n")
    plot_summary(summary, out / "trace.png")
    return out
