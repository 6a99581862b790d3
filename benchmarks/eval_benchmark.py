"""Benchmark: batched evaluation vs one prompt per forward, same code path, same results.

    OMP_NUM_THREADS=1 python benchmarks/eval_benchmark.py [--limit N] [--batch-rows 64]

Evaluates the CounterFact sample (292 records) on the bundled default model when it exists, else on
a randomly initialised GPT-2-small-shaped model (12 layers, 768 wide) with a byte-level BPE tokenizer
trained here on the records' text; the output says which. Timed: :meth:`Evaluator.pre` (pre-edit
answers, every rewrite/paraphrase/neighbourhood check, held-out facts, drift reference when the
bundled held-out text exists). Fluency is off: sampling draws depend on the batch composition.
Asserts the max abs difference of every check's NLL and of every metric < 1e-4, prints a markdown
table and writes it to benchmarks/results/eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from editflow.evaluate import Evaluator, default_heldout_facts, load_heldout_texts  # noqa: E402
from editflow.requests import load_requests  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "editflow" / "assets" / "default_model"
SAMPLES = [ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_sample.json",
           ROOT / "editflow" / "assets" / "counterfact" / "records.json"]


def random_gpt2_small(texts: list[str]) -> tuple[object, object, str]:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=8192, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=768, n_layer=12,
                                       n_head=12)).eval()
    return model, tok, f"random-init GPT-2-small shape (12x768, vocab {len(tok)}, BPE trained on the records)"


def load(requests) -> tuple[object, object, str]:
    if (DEFAULT_MODEL / "config.json").is_file():
        from editflow.models import load_model
        h = load_model(DEFAULT_MODEL, device="cpu")
        return h.model, h.tokenizer, f"bundled default model ({sum(p.numel() for p in h.model.parameters()):,} params)"
    texts = [t for r in requests for t in (r.text, r.target_new, r.target_true or "", *r.paraphrase_prompts,
                                           *r.neighborhood_prompts)]
    return random_gpt2_small(texts)


def run(model, tok, requests, heldout_texts, heldout_facts, one_by_one: bool, batch_rows: int):
    ev = Evaluator((model, tok), requests, heldout_texts=heldout_texts, heldout_facts=heldout_facts,
                   fluency=False, batch_rows=batch_rows, one_by_one=one_by_one)
    start = time.perf_counter()
    res = ev.pre()
    return res, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=Path, default=next((p for p in SAMPLES if p.is_file()), SAMPLES[-1]))
    ap.add_argument("--limit", type=int, default=None, help="first N records only")
    ap.add_argument("--batch-rows", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval.md")
    args = ap.parse_args()

    requests = load_requests(args.records)[: args.limit]
    model, tok, which = load(requests)
    heldout_texts = load_heldout_texts()
    heldout_facts = default_heldout_facts(requests, 100)
    print(f"model: {which}\nrecords: {len(requests)} from {args.records}; held-out facts: {len(heldout_facts)}; "
          f"held-out text lines: {len(heldout_texts)}; torch threads: {torch.get_num_threads()}")

    batched, t_b = run(model, tok, requests, heldout_texts, heldout_facts, False, args.batch_rows)
    single, t_s = run(model, tok, requests, heldout_texts, heldout_facts, True, args.batch_rows)
    nll_cols = ["nll_new", "nll_true"]
    check_diff = float(np.nanmax(np.abs(batched.checks[nll_cols].to_numpy() - single.checks[nll_cols].to_numpy())))
    metric_diff = max(abs(batched.metrics[k] - single.metrics[k]) for k in batched.metrics)
    assert batched.metrics.keys() == single.metrics.keys()
    assert check_diff < 1e-4 and metric_diff < 1e-4, (check_diff, metric_diff)

    n_rows = int(batched.checks[nll_cols].notna().to_numpy().sum())
    m = batched.metrics
    table = "\n".join([
        f"Model: {which}. Records: {len(requests)} ({args.records.name}), {n_rows} scored (prompt, target) "
        f"rows, {int(m['n_heldout'])} held-out facts kept. Device: cpu, {torch.get_num_threads()} thread(s).",
        "",
        "| mode | wall time (s) | rows / s | efficacy | paraphrase | neighborhood | score |",
        "|---|---|---|---|---|---|---|",
        *(f"| {name} | {t:.2f} | {n_rows / t:.0f} | {r.metrics.get('efficacy', float('nan')):.2f} | "
          f"{r.metrics.get('paraphrase', float('nan')):.2f} | {r.metrics.get('neighborhood', float('nan')):.2f} | "
          f"{r.metrics.get('score', float('nan')):.2f} |"
          for name, t, r in ((f"batched ({args.batch_rows} rows)", t_b, batched), ("one prompt at a time", t_s, single))),
        "",
        f"Speed-up: {t_s / t_b:.1f}x. Max abs difference: check NLLs {check_diff:.2e}, metrics {metric_diff:.2e} (< 1e-4).",
    ])
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(f"wrote {args.out}")
    print(json.dumps({k: round(v, 4) for k, v in m.items()}))


if __name__ == "__main__":
    main()
