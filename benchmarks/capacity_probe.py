"""How many counterfactual rewrites can the matrices editflow edits hold? A probe of the ceiling.

MEMIT's closed form protects unrelated text only through the key covariance C. This probe asks what
the same rewrite matrices could do at best: it fine-tunes *only* those matrices (the default layers'
MLP output weights) on all the facts at once (a joint edit, easier than a lineage), with a KL term
that keeps the model's next-token distribution on the statistics corpus (never the held-out text the
drift is measured on). If even this, which sees the corpus distribution directly, cannot rewrite the
facts without raising held-out perplexity, the limit is the matrices' capacity, not MEMIT's solve.
Beside it, in the same run, MEMIT with the model's defaults on the same facts in one batch.

    python benchmarks/capacity_probe.py [--facts 300] [--kl 1] [--steps 150]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from _results import markdown_table, publish  # noqa: E402
from lifelong_sweep import first, usable_requests, whole_evaluator  # noqa: E402

from editflow import assets  # noqa: E402


def edit_batch(
    tokenizer: object, requests: list, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded bare prompts followed by their targets: ids (n, w), mask (n, w) and a weight
    (n, w) that is 1 / target length where a position predicts a target token, else 0."""
    from editflow.tokens import encode, encode_target

    rows, weights = [], []
    for r in requests:
        p, t = encode(tokenizer, r.prompt.format(r.subject)), encode_target(tokenizer, r.target_new)
        rows.append(p + t)
        weights.append([0.0] * (len(p) - 1) + [1.0 / len(t)] * len(t))
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    w = torch.zeros(len(rows), width)
    for i, (row, wt) in enumerate(zip(rows, weights)):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        w[i, : len(wt)] = torch.tensor(wt)
    return ids.to(device), mask.to(device), w.to(device)


def corpus_batches(tokenizer: object, n_lines: int, length: int, seed: int) -> list[list[int]]:
    """Token ids of the statistics corpus's lines (at most ``length`` each), shuffled."""
    lines = [line for line in assets.stats_corpus_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    return [list(tokenizer(line)["input_ids"])[:length] for line in lines[:n_lines]]


def pad(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids.to(device), mask.to(device)


def fine_tune(handle, requests: list, weight_names: list[str], kl: float, steps: int, lr: float, seed: int) -> None:
    """Adam on ``weight_names`` only: target NLL of ``requests`` + ``kl`` · KL(p₀ ‖ p) on corpus tokens."""
    from editflow import progress

    model, tok = handle.model, handle.tokenizer
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [params[n] for n in weight_names]
    for p in trained:
        p.requires_grad_(True)
    ids, mask, w = edit_batch(tok, requests, device)
    corpus = corpus_batches(tok, 4096, int(model.config.n_positions), seed)
    rng = random.Random(seed)
    reference = copy.deepcopy(model).eval()  # p₀: the model as it is now, unedited
    opt = torch.optim.Adam(trained, lr=lr)
    for _ in progress.track(range(steps), desc=f"fine-tune kl={kl}", unit="step"):
        c_ids, c_mask = pad(rng.sample(corpus, 32), device)
        with torch.no_grad():
            ref = torch.log_softmax(reference(input_ids=c_ids, attention_mask=c_mask).logits.float(), -1)  # (b, w, V)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # (n, w, V)
        nll = -(logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2) * w[:, :-1]).sum() / len(requests)
        c_logp = torch.log_softmax(model(input_ids=c_ids, attention_mask=c_mask).logits.float(), -1)
        tok_kl = (ref.exp() * (ref - c_logp)).sum(-1)  # (b, w)
        kl_term = (tok_kl * c_mask).sum() / c_mask.sum()
        loss = nll + kl * kl_term
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=300)
    ap.add_argument("--batch", type=int, default=50, help="batch size the min efficacy is taken over")
    ap.add_argument("--kl", default="1", help="KL weights to try (comma-separated)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from editflow import CorpusSpec, default_config, layer_covariances, load_model, memit
    from editflow.evaluate import Evaluator

    handle = load_model(assets.default_model_dir())
    requests = usable_requests(str(assets.counterfact_records_path()))[: args.facts]
    cfg = default_config(
        handle.adapter.model_type, handle.adapter.n_layers, handle.extra.get("model_defaults", {}).get("hparams")
    )
    names = [handle.adapter.rewrite_weight(layer) for layer in cfg.layers]
    params = dict(handle.model.named_parameters())
    root = {n: params[n].detach().clone() for n in names}
    whole = whole_evaluator(handle, requests)
    pre = whole.pre().metrics
    batches = [requests[k : k + args.batch] for k in range(0, len(requests), args.batch)]

    def row(label: str, seconds: float) -> str:
        post = whole.post().metrics
        effs = [
            first(Evaluator(handle, b, n_auto_neighbors=0, fluency=False).pre().metrics, "efficacy") for b in batches
        ]
        ratio = sum(float((params[n] - root[n]).norm() / root[n].norm()) for n in names) / len(names)
        return (
            f"| {label} | {post['efficacy']:.1f} | {min(effs):.1f} | {post['paraphrase']:.1f} | "
            f"{post['neighborhood']:.1f} ({pre['neighborhood']:.1f}) | {post['heldout'] - pre['heldout']:+.1f} | "
            f"{100 * (post['drift_ppl'] / pre['drift_ppl'] - 1):+.1f} % | {ratio:.3f} | {seconds:.0f} s |"
        )

    lines = []
    covs = layer_covariances(
        handle,
        list(cfg.layers),
        CorpusSpec("bundled"),
        tokens=int(handle.extra.get("model_defaults", {}).get("stats_tokens", 100_000)),
    ).covs
    t0 = time.perf_counter()
    memit.edit(handle.model, handle.tokenizer, handle.adapter, requests, covs, cfg, keep_applied=True)
    lines.append(row(f"MEMIT, one batch (the model's defaults, layers {list(cfg.layers)})", time.perf_counter() - t0))
    print(lines[-1], flush=True)
    memit.restore(handle.model, root)
    for kl in (float(x) for x in args.kl.split(",")):
        t0 = time.perf_counter()
        fine_tune(handle, requests, names, kl, args.steps, args.lr, args.seed)
        lines.append(row(f"fine-tune of the same matrices, corpus KL {kl:g}", time.perf_counter() - t0))
        print(lines[-1], flush=True)
        memit.restore(handle.model, root)
    caption = (
        f"default model, bundled records 0-{args.facts - 1} edited at once; fine-tune: {args.steps} Adam steps, "
        f"lr {args.lr:g}, 32 corpus lines a step; min batch ES over batches of {args.batch}"
    )
    header = [
        "method",
        "ES",
        "min batch ES",
        "PS",
        "NS (pre)",
        "held-out vs root",
        "ppl vs root",
        "mean ‖ΔW‖/‖W‖ of the layers",
        "time",
    ]
    publish("capacity_probe.md", markdown_table(caption, header, lines))


if __name__ == "__main__":
    main()
