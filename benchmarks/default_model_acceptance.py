"""Acceptance figures of the bundled default model on the shipped CounterFact records.

Pre-edit: the model prefers target_true over target_new (mean per-token NLL of " "+target after the
prompt, lower wins) on rewrite and paraphrase prompts, and keeps neighbourhood prompts' true object.
Edit: one MEMIT batch of N records; efficacy, paraphrase and neighbourhood on the edited records.
``--sweep-layers``/``--sweep-lams`` try several layer sets and λ values (to choose the defaults in ``editflow.json``).

    python benchmarks/default_model_acceptance.py [--model DIR] [--n-edits 100] [--sweep-layers "1;1,2" --sweep-lams 10,100]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from editflow.demo import default_model_path, default_records_path  # noqa: E402
from editflow.demo.scoring import counterfact_triples, preference_rate  # noqa: E402

PRE_THRESHOLDS = {"rewrite": 0.95, "paraphrase": 0.90, "neighborhood": 0.90}


def pre_edit(model, tok, records: list[dict]) -> dict[str, float]:
    """Preference for target_true on rewrite, paraphrase and neighbourhood prompts."""
    return {k: preference_rate(model, tok, v) for k, v in counterfact_triples(records).items()}


def post_edit(model, tok, records: list[dict]) -> dict[str, float]:
    """Efficacy / paraphrase (new beats true) and neighbourhood (true beats new) after editing."""
    t = counterfact_triples(records)
    flip = lambda xs: [(p, b, a) for p, a, b in xs]  # noqa: E731
    return {
        "efficacy": preference_rate(model, tok, flip(t["rewrite"])),
        "paraphrase": preference_rate(model, tok, flip(t["paraphrase"])),
        "neighborhood": preference_rate(model, tok, t["neighborhood"]),
    }


def run_edit(
    handle, records: list[dict], overrides: dict, stats_tokens: int, corpus: str = "bundled"
) -> tuple[dict[str, float], float, dict]:
    """One MEMIT batch edit of ``records``; returns post-edit figures, seconds, and the config used."""
    from editflow.config import default_config
    from editflow.memit import edit, undo_deltas
    from editflow.requests import parse_requests
    from editflow.stats import CorpusSpec, layer_covariances

    adapter = handle.adapter
    defaults = handle.extra.get("model_defaults", {}).get("hparams", {})
    cfg = default_config(adapter.model_type, adapter.n_layers, defaults, **overrides)
    covs = layer_covariances(handle, list(cfg.layers), CorpusSpec(corpus), stats_tokens, progress=False).covs
    t0 = time.time()
    res = edit(handle.model, handle.tokenizer, adapter, parse_requests(records), covs, cfg, keep_applied=True)
    seconds = time.time() - t0
    try:
        figures = post_edit(handle.model, handle.tokenizer, records)
    finally:
        undo_deltas(handle.model, res.deltas)
    return figures, seconds, cfg.to_dict()


def _row(name: str, figures: dict[str, float], extra: str = "") -> str:
    return f"{name:<34}" + "".join(f"{k}={v * 100:6.1f}%  " for k, v in figures.items()) + extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--records", default=str(default_records_path()))
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--corpus", default="bundled", help="covariance text (default: assets/corpus/stats.txt)")
    ap.add_argument("--stats-tokens", type=int, default=None, help="default: the model's editflow.json or 20000")
    ap.add_argument("--layers", default=None, help="comma-separated edit layers (default: model's editflow.json)")
    ap.add_argument("--lam", type=float, default=None, help="mom2_update_weight (default: model's editflow.json)")
    ap.add_argument("--sweep-layers", default=None, help='layer sets to try, e.g. "1;1,2;2,3" (with --sweep-lams)')
    ap.add_argument("--sweep-lams", default="10,100,1000", help="λ values tried with --sweep-layers")
    ap.add_argument("--skip-edit", action="store_true")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    records = json.loads(Path(args.records).read_text())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    pre = pre_edit(model, tok, records)
    out: dict = {"pre_edit": pre, "n_records": len(records)}
    print(f"pre-edit on {len(records)} records (prefers target_true / keeps neighbour's object)")
    for k, v in pre.items():
        print(
            f"  {k:<13} {v * 100:6.1f}%  (need ≥ {PRE_THRESHOLDS[k] * 100:.0f}%)  {'PASS' if v >= PRE_THRESHOLDS[k] else 'FAIL'}"
        )

    if not args.skip_edit:
        try:
            from editflow.models import load_model
        except ImportError:
            print("edit: editflow.memit is not available; skipped")
        else:
            handle = load_model(args.model)
            stats_tokens = args.stats_tokens or int(handle.extra.get("model_defaults", {}).get("stats_tokens") or 20000)
            batch = records[: args.n_edits]
            pre_b = pre_edit(handle.model, handle.tokenizer, batch)
            overrides: dict = {}
            if args.layers:
                overrides["layers"] = [int(x) for x in args.layers.split(",")]
            if args.lam is not None:
                overrides["mom2_update_weight"] = args.lam
            grid = [overrides]
            if args.sweep_layers:
                layer_sets = [[int(x) for x in part.split(",")] for part in args.sweep_layers.split(";")]
                lams = [float(x) for x in args.sweep_lams.split(",")]
                grid = [{**overrides, "layers": ls, "mom2_update_weight": lam} for ls in layer_sets for lam in lams]
            print(
                f"\nMEMIT, one batch of {len(batch)} edits (pre-edit neighbourhood on this batch "
                f"{pre_b['neighborhood'] * 100:.1f}%; need efficacy ≥ 95, paraphrase ≥ 70, neighbourhood ≥ pre − 10)"
            )
            out["edits"] = []
            for ov in grid:
                figures, secs, cfg = run_edit(handle, batch, ov, stats_tokens, args.corpus)
                ok = (
                    figures["efficacy"] >= 0.95
                    and figures["paraphrase"] >= 0.70
                    and figures["neighborhood"] >= pre_b["neighborhood"] - 0.10
                )
                name = f"layers={cfg['layers']} λ={cfg['mom2_update_weight']:g}"
                print(_row(name, figures, f"{secs:5.1f}s  {'PASS' if ok else 'FAIL'}"), flush=True)
                out["edits"].append(
                    {
                        "config": cfg,
                        "figures": figures,
                        "seconds": secs,
                        "pass": ok,
                        "pre_neighborhood": pre_b["neighborhood"],
                        "n_edits": len(batch),
                    }
                )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
