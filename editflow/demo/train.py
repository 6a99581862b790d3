"""Train the bundled default model: a GPT-2-architecture LM trained from scratch on the fact corpus.

Seeded and deterministic for a fixed thread count. The checkpoint kept is the one with the best mean
of three accuracies: rewrite prompts, neighbourhood prompts (both trained) and held-out phrasings
(facts asked in a phrasing never seen in training, the guard against memorising prompts); training
stops on a step/time budget, or once rewrite accuracy reaches 99 % and that mean has stalled.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict

import torch
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from editflow.demo.corpus import Corpus, Record
from editflow.demo.options import TrainOptions
from editflow.demo.scoring import counterfact_triples, preference_rate


def model_config(opts: TrainOptions, tok: PreTrainedTokenizerFast) -> GPT2Config:
    """GPT-2 config for the given size; EOS is BOS and pad."""
    return GPT2Config(
        vocab_size=len(tok),
        n_positions=opts.n_positions,
        n_embd=opts.n_embd,
        n_layer=opts.n_layer,
        n_head=opts.n_head,
        n_inner=opts.n_inner,
        resid_pdrop=opts.dropout,
        embd_pdrop=opts.dropout,
        attn_pdrop=opts.dropout,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )


Span = tuple[int, int, int]  # (first subject token, one past the last subject token, end of document)


def subject_token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """Token range covering characters ``[start, end)`` given per-token character offsets."""
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return (inside[0], inside[-1] + 1) if inside else None


def pack_documents(
    tok: PreTrainedTokenizerFast, docs: list[str], max_len: int, subject_of: dict[str, str] | None = None
) -> tuple[torch.Tensor, list[list[Span]]]:
    """Greedily pack whole documents (each followed by EOS) into rows of ``max_len``, padded with -1.

    Also returns, per row, the subject spans (row coordinates) of the documents in ``subject_of``.
    """
    subject_of = subject_of or {}
    rows: list[list[int]] = []
    spans: list[list[Span]] = []
    cur: list[int] = []
    cur_spans: list[Span] = []
    for d in docs:
        enc = tok(d, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][: max_len - 1] + [tok.eos_token_id]
        if len(cur) + len(ids) > max_len:
            rows.append(cur)
            spans.append(cur_spans)
            cur, cur_spans = [], []
        subj = subject_of.get(d)
        span = None
        if subj is not None:
            c0 = d.find(subj)
            span = subject_token_span(enc["offset_mapping"][: len(ids) - 1], c0, c0 + len(subj))
        if span is not None and span[1] - span[0] > 1:
            cur_spans.append((len(cur) + span[0], len(cur) + span[1], len(cur) + len(ids)))
        cur = cur + ids
    if cur:
        rows.append(cur)
        spans.append(cur_spans)
    out = torch.full((len(rows), max_len), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out, spans


def subject_bottleneck_bias(spans: list[list[Span]], length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal attention bias (B, 1, T, T) in which the tokens after each subject see, of the
    subject, only its last token: what they recall about the subject must come through that position."""
    allowed = torch.ones(len(spans), length, length, dtype=torch.bool).tril()
    for b, row in enumerate(spans):
        for s0, s1, end in row:
            allowed[b, s1:end, s0 : s1 - 1] = False
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


def lr_at(step: int, total: int, opts: TrainOptions) -> float:
    """Linear warm-up then cosine decay to 10 % of the peak."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    frac = min(1.0, (step - opts.warmup_steps) / max(1, total - opts.warmup_steps))
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def evaluate(
    model: GPT2LMHeadModel, tok: PreTrainedTokenizerFast, records: list[Record], corpus: Corpus
) -> dict[str, float]:
    """Rewrite, neighbourhood and held-out-phrasing preference for target_true."""
    model.eval()
    triples = counterfact_triples(records)
    out = {
        "rewrite": preference_rate(model, tok, triples["rewrite"]),
        "neighborhood": preference_rate(model, tok, triples["neighborhood"]),
        "heldout_phrasing": preference_rate(model, tok, corpus.heldout_phrasings),
    }
    model.train()
    return out


def selection_score(ev: dict[str, float]) -> float:
    """Checkpoint score: mean of rewrite, neighbourhood and held-out-phrasing accuracy (NaN counts as 0)."""
    vals = [ev[k] for k in ("rewrite", "neighborhood", "heldout_phrasing")]
    return sum(0.0 if math.isnan(v) else v for v in vals) / len(vals)


def train_model(
    corpus: Corpus, tok: PreTrainedTokenizerFast, records: list[Record], opts: TrainOptions
) -> tuple[GPT2LMHeadModel, dict]:
    """Train from scratch; return the chosen model and a summary (history, timings, sizes)."""
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    torch.set_num_threads(opts.threads)
    gen = torch.Generator().manual_seed(opts.seed)
    chosen = torch.rand(len(corpus.train), generator=gen) < opts.subject_bottleneck
    bottlenecked = {
        d: corpus.subject_of[d] for d, c in zip(corpus.train, chosen.tolist()) if c and d in corpus.subject_of
    }
    data, spans = pack_documents(tok, corpus.train, opts.n_positions, bottlenecked)
    model = GPT2LMHeadModel(model_config(opts, tok))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opts.lr,
        betas=(0.9, 0.98),
    )
    steps_per_epoch = math.ceil(len(data) / opts.batch_size)
    total = int(opts.epochs * steps_per_epoch)
    history: list[dict] = []
    best: tuple[float, dict, int] | None = None
    stall, step, t0 = 0, 0, time.time()
    model.train()
    bar = tqdm(total=total, desc="train", mininterval=10)
    while step < total:
        for idx in torch.randperm(len(data), generator=gen).split(opts.batch_size):
            batch = data[idx]
            ids = batch.clamp(min=0)
            labels = batch.masked_fill(batch < 0, -100)
            for g in optim.param_groups:
                g["lr"] = lr_at(step, total, opts)
            bias = subject_bottleneck_bias([spans[i] for i in idx.tolist()], ids.shape[1], torch.float32)
            loss = model(input_ids=ids, attention_mask=bias, labels=labels).loss  # right padding only
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            step += 1
            bar.update(1)
            out_of_time = (time.time() - t0) / 60 > opts.max_minutes
            if step % opts.eval_every == 0 or step == total or out_of_time:
                ev = evaluate(model, tok, records, corpus)
                ev.update(step=step, epoch=step / steps_per_epoch, loss=loss.item(), minutes=(time.time() - t0) / 60)
                history.append(ev)
                bar.write(str({k: round(v, 4) for k, v in ev.items()}))
                key = selection_score(ev)
                if best is None or key > best[0]:
                    stall = 0
                    best = (key, copy.deepcopy(model.state_dict()), step)
                else:
                    stall += 1
                if out_of_time or (ev["rewrite"] >= 0.99 and stall >= opts.patience):
                    total = step
            if step >= total:
                break
    bar.close()
    assert best is not None
    model.load_state_dict(best[1])
    model.eval()
    summary = {
        "options": asdict(opts),
        "train_rows": len(data),
        "steps": step,
        "chosen_step": best[2],
        "steps_per_epoch": steps_per_epoch,
        "train_minutes": (time.time() - t0) / 60,
        "n_params": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    return model, summary
