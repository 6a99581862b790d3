"""editflow on a real pretrained model (SmolLM2-135M-Instruct from its GGUF file), one command.

Three tables, each measured in this run:

* ``speed`` — target optimisation (MEMIT's step 2) as editflow runs it (requests batched, blocks
  0..L and the columns before the subject computed once, the LM head only at the target positions)
  against the reference structure of the MEMIT authors' ``compute_z``: one request at a time, the
  whole model forward at every step, the LM head over every position and the full vocabulary. Both
  optimise the same loss from the same start; the table gives the ratio and how far the z differ.
* ``quality`` — efficacy / paraphrase / neighbourhood / held-out perplexity after one batch of N
  edits, for the published Llama defaults and for the settings stored by ``editflow tune``.
* ``phases`` — the wall time of each phase of one ``editflow edit`` run.

    python benchmarks/real_model.py [--model PATH.gguf] [--sizes 10,100] [--tables speed,quality,phases]
        [--tuned "k=v,..."] [--settings published,tuned] [--stats-tokens 20000] [--threads 2] [--reference-sample K]

The records are the bundled CounterFact records from index 150 on, without 200–204 (``editflow tune``
and the tests use those and the ones before 150).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import markdown_table, publish  # noqa: E402

FIRST_RECORD = 150
#: Records the real-model tier's settings were chosen on (tests/test_real_model.py): left out here.
TIER_RECORDS = range(200, 205)


def records(n: int, split: str = "report") -> list[dict]:
    """The first ``n`` records of a split: ``report`` (index 150 on, without the tier's) or ``tuning``
    (indices 0–149, where settings are chosen)."""
    from editflow import assets

    every = json.loads(assets.counterfact_records_path().read_text())
    if split == "tuning":
        rows = every[:FIRST_RECORD]
    else:
        rows = [r for i, r in enumerate(every) if i >= FIRST_RECORD and i not in TIER_RECORDS]
    if len(rows) < n:
        raise SystemExit(f"error: only {len(rows)} bundled records in the {split} split")
    return rows[:n]


# --------------------------------------------------------------------------- the reference compute_z


def reference_targets(handle, requests, config, templates):
    """z per request, the way the MEMIT authors' compute_z is structured: one request at a time, a
    full forward per step, log-softmax over the full vocabulary at every position, then the targets
    gathered. Same loss as editflow's (NLL of the target tokens / length, KL(p_δ‖p₀) at "{subject} is a",
    weight decay ‖δ‖/‖h‖², clamp, early stop)."""
    import torch

    from editflow import nethook
    from editflow.memit import KL_PROMPT
    from editflow.tokens import encode, encode_target, fact_token_index

    model, tok, adapter = handle.model, handle.tokenizer, handle.adapter
    layer = adapter.layer(config.layers[-1])
    zs = []
    for r in requests:
        target = encode_target(tok, r.target_new)
        rows, facts = [], []
        for t in templates:
            prompt = t.replace("{}", r.prompt, 1) if t != "{}" else r.prompt
            rows.append(encode(tok, prompt.format(r.subject)) + target[:-1])
            facts.append(fact_token_index(tok, prompt, r.subject))
        kl_ids, kl_fact = encode(tok, KL_PROMPT.format(r.subject)), fact_token_index(tok, KL_PROMPT, r.subject)
        with torch.no_grad(), nethook.capture(model, [], [layer]) as got:
            model(input_ids=torch.tensor([rows[0]]))
        h0 = got[layer][0, facts[0]].float()
        delta = torch.zeros_like(h0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=config.v_lr)
        kl_init = None
        for _ in range(config.v_num_grad_steps):
            opt.zero_grad()
            nll = 0.0
            for ids, f in zip(rows, facts):

                def add(h, f=f, delta=delta):
                    h = h.clone()
                    h[0, f] = h[0, f] + delta.to(h.dtype)
                    return h

                with nethook.patch_output(model, layer, add):
                    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
                start = len(ids) - len(target)
                nll = nll - logp[torch.arange(start, start + len(target)), torch.tensor(target)].sum() / len(target)
            loss = nll / len(rows) + config.v_weight_decay * delta.norm() / h0.norm() ** 2
            if config.kl_factor > 0:

                def add_kl(h, kl_fact=kl_fact, delta=delta):
                    h = h.clone()
                    h[0, kl_fact] = h[0, kl_fact] + delta.to(h.dtype)
                    return h

                with nethook.patch_output(model, layer, add_kl):
                    lp = torch.log_softmax(model(input_ids=torch.tensor([kl_ids])).logits[0, kl_fact].float(), -1)
                if kl_init is None:
                    kl_init = lp.detach().clone()
                loss = loss + config.kl_factor * (lp.exp() * (lp - kl_init)).sum()
            if float(loss) < config.v_early_stop_loss:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                max_norm = config.clamp_norm_factor * h0.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
        zs.append((h0 + delta).detach())
    return torch.stack(zs)


def speed_rows(handle, requests_rows, config, sizes, reference_sample: int = 0) -> list[str]:
    """One row per batch size. The reference works one request at a time, so its cost is a sum over
    requests: with ``reference_sample`` = K > 0 it runs on the first K requests of each batch and its
    time is scaled by n / K (the table says so); the z are compared on those K."""
    import torch

    from editflow import memit
    from editflow.requests import parse_requests

    templates = memit.context_templates(
        handle.model, handle.tokenizer, config.context_templates, config.context_template_length, config.seed
    )
    out = []
    for n in sizes:
        reqs = parse_requests(requests_rows[:n])
        t0 = time.perf_counter()
        z, _ = memit.compute_targets(handle.model, handle.tokenizer, handle.adapter, reqs, config, templates)
        ours = time.perf_counter() - t0
        k = min(n, reference_sample) if reference_sample > 0 else n
        t0 = time.perf_counter()
        with memit.frozen_weights(handle.model):
            z_ref = reference_targets(handle, reqs[:k], config, templates)
        ref = (time.perf_counter() - t0) * n / k
        rel = float((z[:k] - z_ref).norm(dim=1).max() / z_ref.norm(dim=1).min())
        how = f"{ref:.1f}" if k == n else f"{ref:.1f} (measured on {k}, × {n / k:g})"
        out.append(f"| {n} | {ours:.1f} | {how} | **{ref / ours:.1f}×** | {rel:.1e} |")
        print(out[-1], flush=True)
        del z, z_ref
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


# --------------------------------------------------------------------------- pipeline runs


def edit_run(model: str, rows: list[dict], hparams: dict, stats_tokens: int) -> dict:
    from editflow.pipeline import EditJob, run_edit
    from editflow.registry.promotion import GateThresholds

    facts = Path(tempfile.mkdtemp(prefix="real-model-")) / "facts.json"
    facts.write_text(json.dumps(rows))
    out = run_edit(
        EditJob(
            requests=str(facts),
            model=model,
            registered_model="smollm2-bench",
            hparams=hparams,
            stats_tokens=stats_tokens,
            promote="never",
            fluency=True,
            thresholds=GateThresholds.measuring(),
        )
    )
    from mlflow import MlflowClient

    m = MlflowClient().get_run(out.run_id).data.metrics
    return {**out.metrics, **{k: v for k, v in m.items() if k.startswith("time/")}}


def published_hparams(model: str) -> dict:
    """The published family defaults for this GGUF (layers scaled to its depth), spelled out, so the
    "published" rows do not take the measured defaults editflow ships for a packaged file."""
    from gguf import GGUFReader

    from editflow.config import default_config
    from editflow.gguf_source import header_field

    reader = GGUFReader(model)
    arch = str(header_field(reader, "general.architecture"))
    config = default_config(arch, int(header_field(reader, f"{arch}.block_count")))
    keys = ("layers", "mom2_update_weight", "v_lr", "v_num_grad_steps", "v_early_stop_loss", "clamp_norm_factor")
    return {k: config.to_dict()[k] for k in (*keys, "kl_factor", "context_templates")}


def quality_row(label: str, n: int, m: dict) -> str:
    f = lambda k: f"{m[k]:.1f}" if k in m else "—"  # noqa: E731
    ppl = f"{100 * m['post/drift_ppl_rel']:+.1f} %" if "post/drift_ppl_rel" in m else "—"
    return (
        f"| {label} | {n} | {f('pre/efficacy')} → {f('post/efficacy')} | {f('pre/paraphrase')} → "
        f"{f('post/paraphrase')} | {f('pre/neighborhood')} → {f('post/neighborhood')} | {ppl} | "
        f"{f('pre/fluency')} → {f('post/fluency')} | {f('pre/heldout')} → {f('post/heldout')} |"
    )


def main() -> None:
    from editflow.commands._options import parse_hparams
    from editflow.fetch import cached_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(cached_path("smollm2-135m") or ""))
    ap.add_argument("--sizes", default="10,100")
    ap.add_argument("--tables", default="speed,quality,phases")
    ap.add_argument("--tuned", default="", help="Tuned settings (k=v,...) for the quality table's second row.")
    ap.add_argument(
        "--split", default="report", choices=["report", "tuning"], help="Records 150– (report) or 0–149 (tuning)."
    )
    ap.add_argument(
        "--settings", default="published,tuned", help="Which rows of the quality table to run (published, tuned)."
    )
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--reference-sample",
        type=int,
        default=0,
        help="Run the per-request reference on this many requests of each batch and scale (0: all).",
    )
    args = ap.parse_args()
    if not args.model:
        raise SystemExit("error: no model; run `editflow fetch smollm2-135m` or pass --model")
    import torch

    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    tables, rows_all = args.tables.split(","), records(max(sizes), args.split)
    store = Path(tempfile.mkdtemp(prefix="real-model-store-"))
    os.chdir(store)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    parts = []
    if "speed" in tables:
        from editflow.config import default_config
        from editflow.gguf_source import load_gguf

        handle = load_gguf(args.model, device="cpu")
        config = default_config(handle.adapter.model_type, handle.adapter.n_layers)
        parts.append(
            markdown_table(
                f"Target optimisation on {Path(args.model).name}, {args.threads} CPU threads, published Llama "
                f"defaults (layers {list(config.layers)}, {config.v_num_grad_steps} steps, "
                f"{config.context_templates} context templates)",
                ["requests", "editflow (s)", "reference compute_z (s)", "speed-up", "max ‖Δz‖/‖z‖"],
                speed_rows(handle, rows_all, config, sizes, args.reference_sample),
            )
        )
        del handle
    results = {}
    if "quality" in tables or "phases" in tables:
        wanted = args.settings.split(",")
        settings = [("published Llama defaults", published_hparams(args.model))] if "published" in wanted else []
        if args.tuned and "tuned" in wanted:
            settings.append(("tuned", parse_hparams(args.tuned)))
        for label, hp in settings:
            for n in sizes:
                results[(label, n)] = edit_run(args.model, rows_all[:n], hp, args.stats_tokens)
    if "quality" in tables:
        parts.append(
            markdown_table(
                f"Quality on {Path(args.model).name} (bundled CounterFact records "
                f"{'0–149' if args.split == 'tuning' else f'{FIRST_RECORD}– without the tier’s 200–204'}, one batch; pre → post)",
                [
                    "settings",
                    "edits",
                    "efficacy",
                    "paraphrase",
                    "neighbourhood",
                    "held-out perplexity",
                    "fluency",
                    "held-out facts",
                ],
                [quality_row(label, n, m) for (label, n), m in results.items()],
            )
        )
    if "phases" in tables:
        phases = ("load", "stats", "eval_pre", "edit_targets", "edit_solve", "eval_post")
        rows = []
        for (label, n), m in results.items():
            total = sum(m.get(f"time/{p}", 0.0) for p in phases)
            evals = m.get("time/eval_pre", 0.0) + m.get("time/eval_post", 0.0)
            rows.append(
                f"| {label} | {n} | "
                + " | ".join(f"{m.get(f'time/{p}', 0.0):.0f}" for p in phases)
                + f" | {100 * evals / total:.0f} % |"
            )
        parts.append(
            markdown_table(
                "Phase wall times (s) of one edit run", ["settings", "edits", *phases, "evaluation share"], rows
            )
        )
    publish("real_model.md", "\n\n".join(parts))


if __name__ == "__main__":
    main()
