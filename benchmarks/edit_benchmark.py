"""Edit speed: batched target optimisation vs one request at a time (the reference structure).

The batched path is editflow's default (prefix caching on); the reference optimises each request on
its own with full forward passes (``prefix_cache=False``), as the original MEMIT code does.

    python benchmarks/edit_benchmark.py [--sizes 10,100,1000] [--model DIR] [--threads 2] [--parallel]

Each (path, size) runs in its own process so its peak RSS is its own. Both paths use the same model,
covariances, hyperparameters and requests; efficacy (P(new) > P(true) on the edited prompt after
the edit) is reported for both. Requests: the bundled CounterFact records, then zsRE records, then
CounterFact paraphrases as further requests, until the size is reached. Writes a markdown table to
benchmarks/results/edit.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import markdown_table, publish  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def benchmark_requests(n: int, handle=None, config=None):
    """The first ``n`` distinct requests; with ``handle`` and ``config``, only those that fit the model's
    positions with every context template (see ``memit.check_lengths``)."""
    from editflow import memit
    from editflow.requests import EditRequest, parse_requests

    cf = json.loads((ROOT / "editflow/assets/counterfact/records.json").read_text())
    out: list[EditRequest] = parse_requests(cf)
    zsre_path = SHARED / "zsre" / "zsre_sample.json"
    if zsre_path.is_file():
        out += parse_requests(json.loads(zsre_path.read_text()))
    for r in parse_requests(cf):
        for p in r.paraphrase_prompts:
            if r.subject in p:
                out.append(
                    EditRequest(
                        prompt=p.replace("{", "{{").replace("}", "}}").replace(r.subject, "{}", 1),
                        subject=r.subject,
                        target_new=r.target_new,
                        target_true=r.target_true,
                    )
                )
    templates = (
        []
        if handle is None
        else memit.context_templates(
            handle.model, handle.tokenizer, config.context_templates, config.context_template_length, config.seed
        )
    )

    def fits(r: EditRequest) -> bool:
        try:
            memit.check_lengths(handle.model, handle.tokenizer, [r], templates)
        except ValueError:
            return False
        return True

    seen, unique = set(), []
    for r in out:
        if (r.subject, r.prompt) not in seen and (handle is None or fits(r)):
            seen.add((r.subject, r.prompt))
            unique.append(r)
    if len(unique) < n:
        raise SystemExit(f"only {len(unique)} benchmark requests available")
    return unique[:n]


def worker(model_dir: str, n: int, path: str, tokens: int) -> dict:
    import torch

    from editflow import memit
    from editflow.config import default_config
    from editflow.evaluate import score_targets
    from editflow.models import load_model
    from editflow.stats import CorpusSpec, layer_covariances

    handle = load_model(model_dir, device="cpu")
    config = default_config(
        handle.adapter.model_type, handle.adapter.n_layers, handle.extra["model_defaults"].get("hparams", {})
    )
    requests = benchmark_requests(n, handle, config)
    covs = layer_covariances(handle, list(config.layers), CorpusSpec("bundled"), tokens, progress=False).covs
    t0 = time.perf_counter()
    result = memit.edit(
        handle.model,
        handle.tokenizer,
        handle.adapter,
        requests,
        covs,
        config,
        requests_per_batch=64 if path == "batched" else 1,
        prefix_cache=path == "batched",
    )
    seconds = time.perf_counter() - t0
    memit.apply_deltas(handle.model, result.deltas)
    with torch.no_grad():
        new = score_targets(handle.model, handle.tokenizer, [(r.text, r.target_new) for r in requests])
        true = score_targets(handle.model, handle.tokenizer, [(r.text, r.target_true or "") for r in requests])
    efficacy = float((new.nll < true.nll).mean()) * 100
    return {
        "path": path,
        "n": n,
        "seconds": seconds,
        "targets_s": result.timings.get("targets", 0.0),
        "solve_s": result.timings.get("solve", 0.0),
        "efficacy": efficacy,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--model", default=str(ROOT / "editflow/assets/default_model"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    ap.add_argument(
        "--parallel",
        action="store_true",
        help="run the two paths of a size at the same time (use with --threads 1 on 2 cores)",
    )
    ap.add_argument("--worker", nargs=2, metavar=("PATH", "N"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.model, int(args.worker[1]), args.worker[0], args.stats_tokens)))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        procs, outputs = {}, {}
        for path in ("batched", "one-at-a-time"):  # concurrently with --parallel, else one after the other
            cmd = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--threads",
                str(args.threads),
                "--stats-tokens",
                str(args.stats_tokens),
                "--worker",
                path,
                str(n),
            ]
            procs[path] = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            if not args.parallel:
                outputs[path] = procs[path].communicate()
        pair = {}
        for path, proc in procs.items():
            out, err = outputs.get(path) or proc.communicate()
            if proc.returncode:
                raise SystemExit(err[-2000:])
            pair[path] = json.loads(out.strip().splitlines()[-1])
            print(pair[path], flush=True)
        b, r = pair["batched"], pair["one-at-a-time"]
        rows.append(
            f"| {n} | {b['seconds']:.1f} | {r['seconds']:.1f} | **{r['seconds'] / b['seconds']:.1f}×** | "
            f"{b['efficacy']:.1f} | {r['efficacy']:.1f} | {b['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    caption = (
        f"Model: {Path(args.model).name} · CPU threads per path: {args.threads}"
        f"{' (both paths at once)' if args.parallel else ''} · statistics: {args.stats_tokens} "
        "bundled-corpus tokens"
    )
    publish(
        "edit.md",
        markdown_table(
            caption,
            [
                "requests",
                "batched (s)",
                "one at a time (s)",
                "speed-up",
                "efficacy batched (%)",
                "efficacy reference (%)",
                "peak RSS batched (MB)",
                "peak RSS reference (MB)",
            ],
            rows,
        ),
    )


if __name__ == "__main__":
    main()
