"""Choose the lifelong-editing defaults by measurement, at the engine level (no registry, fast).

For each candidate setting: V successive edits of N facts each on one model, every edit carrying
the keys of all edits before it (exactly what a lineage's edit state gives the next version), then
at the end every batch's efficacy, the held-out known facts, neighbourhood and perplexity against
the unedited model. Run it on a tuning split: by default the bundled records 150-299 (6 × 25),
so that ``benchmarks/lifelong.py --facts 25`` on records 0-149 reports on records never tuned on.

    python benchmarks/lifelong_sweep.py [--records FILE] [--offset 150] [--versions 6] [--facts 25]
        [--grid 'algorithm=alphaedit,nullspace_threshold=1e-3;...']
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from _records import without_evaluated_anchors  # noqa: E402
from _results import markdown_table, publish  # noqa: E402

from editflow import assets  # noqa: E402

DEFAULT_GRID = ";".join(
    [
        "algorithm=alphaedit",
        "algorithm=alphaedit,nullspace_threshold=2e-3",
        "algorithm=alphaedit,nullspace_threshold=2e-4",
        "algorithm=alphaedit,alphaedit_l2=100",
        "algorithm=memit,preserve_edits=true",
        "algorithm=memit,preserve_edits=true,mom2_update_weight=1000",
        "algorithm=memit,preserve_edits=true,mom2_update_weight=10000",
    ]
)


def run_setting(handle, covs, batches, base_cfg, overrides: dict, evaluate, corpus: list) -> dict:
    """Edit the batches one after another, carrying the keys (and repairing each solve when the
    setting asks for it, on ``corpus``); the figures at the last version."""
    from editflow import memit, repair
    from editflow.edit_state import EditState
    from editflow.registry.lineage import earlier_facts

    cfg = base_cfg.replace(**overrides)
    state = EditState()
    params = dict(handle.model.named_parameters())
    backup = {n: params[n].detach().clone() for n in (handle.adapter.rewrite_weight(layer) for layer in cfg.layers)}
    t0 = time.perf_counter()
    try:
        for i, batch in enumerate(batches):
            held = [r for b in batches[:i] for r in b]
            preserved = state.preserved(list(cfg.layers), handle.adapter.d_ff) if state.layers else None
            result = memit.edit(
                handle.model,
                handle.tokenizer,
                handle.adapter,
                batch,
                covs,
                cfg,
                keep_applied=True,
                preserved=preserved,
            )
            result = repair.repair(
                handle.model,
                handle.tokenizer,
                handle.adapter,
                batch,
                result,
                covs,
                cfg,
                corpus,
                preserved,
                earlier=earlier_facts(held, batch, seed=cfg.seed)[0],
            )
            state = state.extended(result.keys)
        seconds = time.perf_counter() - t0
        return {**evaluate(), "seconds": seconds}
    finally:
        memit.restore(handle.model, backup)


def first(metrics: dict, *names: str) -> float:
    """The first of ``names`` in ``metrics`` (CounterFact and zsRE name the same figure differently)."""
    return next((float(metrics[n]) for n in names if n in metrics), float("nan"))


def whole_evaluator(handle, edited: list):
    """An evaluator of all ``edited`` facts with drift on text about none of them and the held-out
    known facts (no auto neighbours, no fluency: what the engine-level sweeps compare)."""
    from editflow.evaluate import Evaluator, default_heldout_facts, drift_texts

    return Evaluator(
        handle,
        edited,
        heldout_texts=drift_texts(edited),
        heldout_facts=default_heldout_facts(edited),
        n_auto_neighbors=0,
        fluency=False,
    )


def usable_requests(path: str) -> list:
    """The records of ``path`` that are valid edits with a true answer, each parsed on its own so one
    bad record drops only itself (zsRE samples hold a few whose new answer equals the true one)."""
    from editflow.requests import RequestError, parse_requests

    out, seen = [], set()
    for record in without_evaluated_anchors(json.loads(Path(path).read_text())):
        try:
            (req,) = parse_requests([record])
        except RequestError:
            continue
        if req.source_format == "zsre":  # scored as CounterFact is: P(new) against P(true)
            req = dataclasses.replace(req, source_format="plain", loc=None, loc_ans=None)
        if req.target_true and (req.subject, req.prompt) not in seen:
            seen.add((req.subject, req.prompt))
            out.append(req)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--records", default=str(assets.counterfact_records_path()))
    ap.add_argument("--offset", type=int, default=150, help="first record used (the tuning split)")
    ap.add_argument("--versions", type=int, default=6)
    ap.add_argument("--facts", type=int, default=25)
    ap.add_argument("--grid", default=DEFAULT_GRID)
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    args = ap.parse_args()

    from editflow import CorpusSpec, default_config, layer_covariances, load_model
    from editflow.commands._options import parse_hparams
    from editflow.evaluate import Evaluator
    from editflow.pipeline import REPAIR_DOCUMENTS
    from editflow.repair import corpus_documents
    from editflow.stats.corpus import Sampling, sample_documents

    handle = load_model(assets.default_model_dir() if args.model == "default" else args.model)
    requests = usable_requests(args.records)[args.offset :]
    need = args.versions * args.facts
    if len(requests) < need:
        raise SystemExit(f"error: {need} records needed, {args.records} has {len(requests)}")
    batches = [requests[k * args.facts : (k + 1) * args.facts] for k in range(args.versions)]
    base_cfg = default_config(
        handle.adapter.model_type, handle.adapter.n_layers, handle.extra.get("model_defaults", {}).get("hparams")
    )
    settings = [parse_hparams(spec) for spec in args.grid.split(";")]
    layers = sorted({layer for o in settings for layer in base_cfg.replace(**o).layers})
    covs = layer_covariances(handle, layers, CorpusSpec("bundled"), tokens=args.stats_tokens).covs

    docs = sample_documents(CorpusSpec("bundled"), Sampling(seed=base_cfg.seed))
    corpus = corpus_documents(docs, handle.tokenizer, REPAIR_DOCUMENTS)

    edited = [r for b in batches for r in b]
    whole = whole_evaluator(handle, edited)
    pre = whole.pre().metrics
    per_batch = [Evaluator(handle, b, n_auto_neighbors=0, fluency=False) for b in batches]

    def evaluate() -> dict:
        post = whole.post().metrics
        effs = [first(ev.pre().metrics, "efficacy", "zsre_efficacy") for ev in per_batch]
        for ev in per_batch:
            ev.pre_result = None
        return {
            "effs": effs,
            "ps": first(post, "paraphrase", "zsre_paraphrase"),
            "ns": first(post, "neighborhood", "zsre_specificity"),
            "heldout": post.get("heldout"),
            "ppl_rel": 100 * (post["drift_ppl"] / pre["drift_ppl"] - 1),
        }

    lines = []
    for spec, overrides in zip(args.grid.split(";"), settings):
        r = run_setting(handle, covs, batches, base_cfg, overrides, evaluate, corpus)
        effs = r["effs"]
        line = (
            f"| {spec} | {min(effs):.1f} | {sum(effs) / len(effs):.1f} | {r['ps']:.1f} | {r['ns']:.1f} ({first(pre, 'neighborhood', 'zsre_specificity'):.1f}) | "
            f"{r['heldout'] - pre['heldout']:+.1f} | {r['ppl_rel']:+.1f} % | {r['seconds']:.0f} s |"
        )
        print(line, flush=True)
        lines.append(line)
    caption = (
        f"{args.model}, {Path(args.records).name} from record {args.offset}, {args.versions} × {args.facts} edits carried through; "
        f"figures at the last edit"
    )
    header = [
        "setting",
        "min batch ES",
        "mean batch ES",
        "PS",
        "NS (pre)",
        "held-out vs root",
        "ppl vs root",
        "edit time",
    ]
    publish(f"lifelong_sweep_{Path(args.records).stem}.md", markdown_table(caption, header, lines))
    print(json.dumps({"pre": pre}))


if __name__ == "__main__":
    main()
