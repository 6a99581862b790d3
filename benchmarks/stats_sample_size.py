"""Edit quality as a function of the statistics' token count, on the bundled default model.

    python benchmarks/stats_sample_size.py [--sizes 10000,30000,100000,300000,1000000,2000000] [--n 100]

For each budget: C from the bundled corpus (cached), one batch edit of the first N bundled CounterFact
records with the model's default hyperparameters, then efficacy / paraphrase / neighbourhood (and the
held-out perplexity drift). The default budget in the model's editflow.json is chosen from this table.
Writes benchmarks/results/stats_sample_size.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import markdown_table, publish  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,30000,100000,300000,1000000,2000000")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from editflow import memit
    from editflow.config import default_config
    from editflow.demo import default_model_path
    from editflow.evaluate import Evaluator, drift_texts
    from editflow.models import load_model
    from editflow.requests import parse_requests
    from editflow.stats import CorpusSpec, layer_covariances

    torch.set_num_threads(args.threads)
    handle = load_model(default_model_path(), device="cpu")
    config = default_config(
        handle.adapter.model_type, handle.adapter.n_layers, handle.extra["model_defaults"].get("hparams", {})
    )
    records = json.loads((ROOT / "editflow/assets/counterfact/records.json").read_text())
    requests = parse_requests(records[: args.n])
    evaluator = Evaluator(handle, requests, heldout_texts=drift_texts(requests), fluency=False)
    pre = evaluator.pre().metrics
    rows = [f"| pre-edit | – | – | {pre['efficacy']:.1f} | {pre['paraphrase']:.1f} | {pre['neighborhood']:.1f} | – |"]
    for tokens in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        res = layer_covariances(handle, list(config.layers), CorpusSpec("bundled"), tokens, progress=False)
        stats_s = time.perf_counter() - t0
        got = int(res.entries[0].manifest.get("tokens", tokens))
        result = memit.edit(handle.model, handle.tokenizer, handle.adapter, requests, res.covs, config)
        backup = memit.apply_deltas(handle.model, result.deltas)
        post = evaluator.post().metrics
        memit.restore(handle.model, backup)
        rows.append(
            f"| {tokens:,} | {got:,} | {stats_s:.1f} | {post['efficacy']:.1f} | {post['paraphrase']:.1f} | "
            f"{post['neighborhood']:.1f} | {100 * post.get('drift_ppl_rel', float('nan')):+.1f} |"
        )
        print(rows[-1], flush=True)
    caption = (
        f"Default model, {args.n} CounterFact records in one batch, layers {list(config.layers)}, "
        f"λ = {config.mom2_update_weight:g}"
    )
    publish(
        "stats_sample_size.md",
        markdown_table(
            caption,
            [
                "budget (tokens)",
                "tokens used",
                "stats time (s)",
                "efficacy",
                "paraphrase",
                "neighbourhood",
                "held-out ppl change (%)",
            ],
            rows,
        ),
    )


if __name__ == "__main__":
    main()
