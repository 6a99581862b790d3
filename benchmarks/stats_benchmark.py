"""Layer statistics: editflow's single pass vs the reference structure (one pass per layer).

The reference follows the MEMIT code's ``layer_stats``: for each layer separately, tokenise the
sample (truncated to max length), take groups of 100 texts, sort each group by length and split it
into padded batches of at most ``batch_tokens`` tokens, run the model with a hook that keeps the
rewrite module's input and stops after that module, drop the padding rows and add aᵀa to a float32
sum. editflow collects all layers in one pass that stops at the deepest layer's rewrite input.

Both see the same documents and the same number of tokens, with the same ``batch_tokens``. The
forward-FLOP bound counts the matmuls of the truncated model (and the aᵀa updates) at this CPU's
measured fp32 matmul rate. Each method runs in a forked child of the process holding the model;
peak memory is the largest RSS increase in that child (sampled from /proc every 10 ms).

    OMP_NUM_THREADS=1 python benchmarks/stats_benchmark.py            # default model (or a GPT-2-small stand-in)
    OMP_NUM_THREADS=1 python benchmarks/stats_benchmark.py --xl       # + random GPT-2-XL shape, layers 13-17
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import editflow
from editflow.models import Adapter, ModelHandle, detect_adapter, load_model, prepare_tokenizer
from editflow.stats import bundled_corpus_path, collect
from editflow.stats.batching import Budget, tokenize
from editflow.tokens import pad_id, pad_right

RESULTS = Path(__file__).parent / "results" / "stats.md"
DEFAULT_MODEL = Path(editflow.__file__).parent / "assets" / "default_model"


# ----------------------------------------------------------------------------- the reference structure


class _Stop(Exception):
    pass


def reference_layer_stats(
    model: torch.nn.Module,
    tokenizer: object,
    module_name: str,
    texts: Sequence[str],
    max_length: int,
    batch_tokens: int,
    group: int = 100,
) -> torch.Tensor:
    """Σ aᵀa / n for one layer, structured as MEMIT's ``layer_stats`` (one pass, stop after the module)."""
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]  # type: ignore[operator]
    module = model.get_submodule(module_name)
    kept: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, args: tuple, _out: object) -> None:
        kept["input"] = args[0]
        raise _Stop

    handle = module.register_forward_hook(hook)
    mom2, count = None, 0
    try:
        with torch.no_grad():
            for start in range(0, len(ids), group):
                for batch_ids in _length_collation(ids[start : start + group], batch_tokens):
                    batch = pad_right(batch_ids, pad_id(tokenizer))
                    try:
                        model(**batch.model_inputs())
                    except _Stop:
                        pass
                    a = kept["input"][batch.attention_mask.bool()].float()
                    mom2 = a.new_zeros(a.shape[1], a.shape[1]) if mom2 is None else mom2
                    mom2 += a.t().mm(a)
                    count += a.shape[0]
    finally:
        handle.remove()
    return mom2 / count


def _length_collation(ids: list[list[int]], batch_tokens: int) -> list[list[list[int]]]:
    batches, batch = [], []
    for seq in sorted(ids, key=len, reverse=True):
        if batch and (len(batch) + 1) * len(batch[0]) > batch_tokens:
            batches.append(batch)
            batch = []
        batch.append(seq)
    return batches + ([batch] if batch else [])


# ----------------------------------------------------------------------------- measurement helpers


class PeakRSS:
    """Largest RSS increase (bytes) over the RSS at entry, sampled every 10 ms."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def increase(self) -> int:
        return self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def matmul_gflops(n: int = 1536, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - t) / 1e9


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def forward_flops(
    model: torch.nn.Module, adapter: Adapter, layer: int, include_rewrite: bool, mean_len: float
) -> float:
    """Matmul FLOPs per token of blocks 0..layer (embeddings are lookups; attention scores included)."""
    flops = 0.0
    for i in range(layer + 1):
        flops += 2 * _param_count(model.get_submodule(adapter.layer(i))) + 4 * mean_len * adapter.d_model
    if not include_rewrite:
        flops -= 2 * _param_count(model.get_submodule(adapter.rewrite(layer)))
    return flops


@dataclass
class Row:
    setup: str
    method: str
    tokens: int
    seconds: float
    bound_seconds: float
    peak_mb: float
    ratio: float = 1.0

    def cells(self) -> list[str]:
        return [
            self.setup,
            self.method,
            str(self.tokens),
            f"{self.seconds:.1f}",
            f"{self.ratio:.2f}x",
            f"{self.tokens / self.seconds:,.0f}",
            f"{self.tokens / self.bound_seconds:,.0f}",
            f"{100 * self.bound_seconds / self.seconds:.0f}%",
            f"{self.peak_mb:,.0f}",
        ]


HEADER = ["setup", "method", "tokens", "wall s", "speed-up", "tok/s", "bound tok/s", "of bound", "peak +MB"]


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """Run ``fn`` in a forked child (same model, fresh allocator peak): (result, seconds, peak RSS increase MB)."""
    import multiprocessing as mp
    import tempfile

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = Path(tmp) / "out.pt"

        def child() -> None:
            with PeakRSS() as mem:
                t = time.perf_counter()
                out = fn()
                seconds = time.perf_counter() - t
            torch.save(out, out_path)
            queue.put((seconds, mem.increase / 2**20))

        proc = ctx.Process(target=child)
        proc.start()
        seconds, peak = queue.get()
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"benchmark child failed with exit code {proc.exitcode}")
        return torch.load(out_path), seconds, peak


# ----------------------------------------------------------------------------- one comparison


def compare(
    setup: str,
    handle: ModelHandle,
    layers: list[int],
    texts: list[str],
    tokens: int,
    max_length: int,
    batch_tokens: int,
    gflops: float,
) -> list[Row]:
    model, tok, adapter = handle.model, handle.tokenizer, handle.adapter
    budget = Budget(tokens)
    sample = [texts[d.index] for d in budget.take(tokenize(texts, tok, max_length))]
    n = budget.taken
    mean_len = n / max(len(sample), 1)
    cov_flops = 2 * adapter.d_ff**2
    bound_single = n * (forward_flops(model, adapter, max(layers), False, mean_len) + len(layers) * cov_flops)
    bound_ref = n * sum(forward_flops(model, adapter, layer, True, mean_len) + cov_flops for layer in layers)

    single, t_single, m_single = timed(
        lambda: {
            layer: s.mom2()
            for layer, s in collect(
                model, tok, adapter, layers, sample, n, max_length, torch.float32, batch_tokens, progress=False
            )[0].items()
        }
    )
    ref, t_ref, m_ref = timed(
        lambda: {
            layer: reference_layer_stats(model, tok, adapter.rewrite(layer), sample, max_length, batch_tokens)
            for layer in layers
        }
    )
    worst = max(float((single[l] - ref[l]).abs().max() / ref[l].abs().max()) for l in layers)  # type: ignore[index]
    print(f"[{setup}] max relative difference editflow vs reference: {worst:.2e}")
    assert worst < 1e-3, "editflow and the reference disagree"
    return [
        Row(setup, "reference (1 pass/layer)", n, t_ref, bound_ref / gflops / 1e9, m_ref, 1.0),
        Row(setup, "editflow (single pass)", n, t_single, bound_single / gflops / 1e9, m_single, t_ref / t_single),
    ]


# ----------------------------------------------------------------------------- inputs


def corpus_texts(n_docs: int = 4000, seed: int = 0) -> tuple[list[str], str]:
    """The bundled corpus when present, else deterministic synthetic prose of mixed lengths."""
    path = bundled_corpus_path()
    if path.is_file():
        docs = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        random.Random(seed).shuffle(docs)
        return docs, f"bundled ({path.name})"
    rng = random.Random(seed)
    words = (
        "the of and in to a is was for on as by with from at that his her their which city river "
        "village church school bridge market county century born known called built founded during "
        "after before north south east west new old first second team album film series station"
    ).split()
    docs = []
    for _ in range(n_docs):
        sentences = [
            " ".join(rng.choice(words) for _ in range(rng.randint(6, 20))).capitalize() + "."
            for _ in range(rng.randint(1, 30))
        ]
        docs.append(" ".join(sentences))
    return docs, "synthetic prose"


def train_tokenizer(texts: list[str], vocab_size: int = 4000) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"]))
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>"))


def random_gpt2(n_layer: int, n_embd: int, n_head: int, vocab: int, tokenizer: object) -> ModelHandle:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            vocab_size=vocab,
            n_positions=1024,
            bos_token_id=eos,
            eos_token_id=eos,
        )
    ).eval()
    return ModelHandle(model, tokenizer, detect_adapter(model), source=f"random gpt2 {n_layer}x{n_embd}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20000, help="tokens for the default/small model")
    parser.add_argument("--xl", action="store_true", help="also run a random GPT-2-XL-shaped model (6 GB, minutes)")
    parser.add_argument("--xl-tokens", type=int, default=3000)
    parser.add_argument("--batch-tokens", type=int, default=3072, help="padded tokens per batch (both methods)")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    gflops = matmul_gflops()
    texts, corpus_name = corpus_texts()
    print(f"torch threads {torch.get_num_threads()}, fp32 matmul {gflops:.1f} GFLOP/s, corpus: {corpus_name}")
    rows: list[Row] = []
    notes = [
        f"CPU fp32 matmul rate {gflops:.1f} GFLOP/s with {torch.get_num_threads()} thread(s); corpus: "
        f"{corpus_name}; batch_tokens {args.batch_tokens} for both methods."
    ]

    if (DEFAULT_MODEL / "config.json").is_file():
        small = load_model(DEFAULT_MODEL, device="cpu", dtype="float32")
        n = small.adapter.n_layers
        from editflow.config import default_config

        layers = list(default_config(small.adapter.model_type, n).layers)
        setup = f"bundled default model ({n} layers, d={small.adapter.d_model}), layers {layers[0]}-{layers[-1]}"
    else:
        tok = train_tokenizer(texts[:2000])
        small = random_gpt2(12, 768, 12, len(tok), tok)
        layers = [3, 4, 5, 6, 7]
        setup = "random GPT-2-small shape (12x768; no bundled model yet), layers 3-7"
    max_length = min(1024, int(getattr(small.model.config, "n_positions", 1024)))
    rows += compare(setup, small, layers, texts, args.tokens, max_length, args.batch_tokens, gflops)
    del small

    if args.xl:
        tok = train_tokenizer(texts[:2000])
        t = time.perf_counter()
        xl = random_gpt2(48, 1600, 25, 50257, tok)
        print(f"built GPT-2-XL shape in {time.perf_counter() - t:.0f} s")
        rows += compare(
            "random GPT-2-XL shape (48x1600, fp32), layers 13-17",
            xl,
            [13, 14, 15, 16, 17],
            texts,
            args.xl_tokens,
            1024,
            args.batch_tokens,
            gflops,
        )

    table = "\n".join(
        ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        + ["| " + " | ".join(r.cells()) + " |" for r in rows]
    )
    text = (
        f"# Layer statistics: single pass vs one pass per layer\n\n{table}\n\n"
        + "\n".join(
            f"- {n}"
            for n in notes
            + [
                "bound tok/s: tokens / (matmul FLOPs of the truncated forward + aᵀa updates at the measured rate).",
                "peak +MB: largest RSS increase during the method (model weights excluded).",
            ]
        )
        + "\n"
    )
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
