"""Timings on a CUDA device (called by gpu_check.sh): one statistics pass over the bundled corpus and a
1,000-fact batch edit of the default model, with efficacy; prints a small table."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edit_benchmark import benchmark_requests  # noqa: E402

from editflow import memit  # noqa: E402
from editflow.config import default_config  # noqa: E402
from editflow.demo import default_model_path  # noqa: E402
from editflow.evaluate import score_targets  # noqa: E402
from editflow.models import load_model  # noqa: E402
from editflow.stats import CorpusSpec, layer_covariances  # noqa: E402


def main(tokens: int = 1_000_000, n: int = 1000) -> None:
    handle = load_model(default_model_path(), device="cuda")
    config = default_config(
        handle.adapter.model_type, handle.adapter.n_layers, handle.extra["model_defaults"].get("hparams", {})
    )
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = layer_covariances(
        handle, list(config.layers), CorpusSpec("bundled"), tokens, cache_dir="/tmp/gpu-stats", progress=False
    )
    torch.cuda.synchronize()
    stats_s = time.perf_counter() - t0
    got = int(res.entries[0].manifest.get("tokens", tokens))
    requests = benchmark_requests(n, handle, config)
    t0 = time.perf_counter()
    result = memit.edit(handle.model, handle.tokenizer, handle.adapter, requests, res.covs, config)
    torch.cuda.synchronize()
    edit_s = time.perf_counter() - t0
    memit.apply_deltas(handle.model, result.deltas)
    new = score_targets(handle.model, handle.tokenizer, [(r.text, r.target_new) for r in requests])
    true = score_targets(handle.model, handle.tokenizer, [(r.text, r.target_true or "") for r in requests])
    print("| what | value |\n|---|---|")
    print(
        f"| statistics pass, {len(config.layers)} layers, {got} tokens | {stats_s:.1f} s ({got / stats_s:,.0f} tok/s) |"
    )
    print(
        f"| batch edit, {n} facts | {edit_s:.1f} s (targets {result.timings['targets']:.1f} s, "
        f"solve {result.timings['solve']:.1f} s) |"
    )
    print(f"| efficacy after the edit | {float((new.nll < true.nll).mean()) * 100:.1f} % |")
    print(f"| peak CUDA memory | {torch.cuda.max_memory_allocated() / 2**20:.0f} MB |")


if __name__ == "__main__":
    main()
