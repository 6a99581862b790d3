"""Benchmark: the evaluation now vs the previous implementation, in the same run, same model, same data.

    OMP_NUM_THREADS=1 python benchmarks/eval_benchmark.py [--model /tmp/smol/hf] [--limit 20]
        [--reference-rev 9f900bf] [--threads 1]

Model: ``--model`` (a saved Hugging Face folder, e.g. SmolLM2-135M-Instruct) or the bundled default
model. Records: the first ``--limit`` bundled CounterFact records. The previous implementation is
``editflow/evaluate`` at git revision ``--reference-rev`` (the commit before the batching / cache /
known-facts rework), imported from ``git show`` as a separate package.

Timed, for each implementation with its own defaults (fluency on, drift, held-out facts):
``pre()`` on the unedited model and ``post()`` after a fixed perturbation of one MLP weight (the cost
of an evaluation does not depend on the edit); for the new one also ``pre(known=...)`` from a saved
:class:`~editflow.evaluate.PreState`. Asserts every metric except the held-out ones (whose selection
changed on purpose) agrees within 1e-4 (fluency included: same batches, same draws), prints a
markdown table with ratios and writes it to benchmarks/results/eval.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from editflow.requests import load_requests  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "editflow" / "assets" / "default_model"
RECORDS = ROOT / "editflow" / "assets" / "counterfact" / "records.json"
REFERENCE_REV = "9f900bf"
HELDOUT_KEYS = ("heldout", "heldout_magnitude", "heldout_top1", "heldout_prob", "n_heldout")


def import_reference(rev: str, where: Path):
    """``editflow/evaluate`` at ``rev`` as the package ``ef_ref_evaluate`` (imports rewritten)."""
    names = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:editflow/evaluate"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    pkg = where / "ef_ref_evaluate"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in (n for n in names if n.endswith(".py")):
        src = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:editflow/evaluate/{name}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (pkg / name).write_text(src.replace("editflow.evaluate", "ef_ref_evaluate"))
    sys.path.insert(0, str(where))
    return importlib.import_module("ef_ref_evaluate")


def load(model_path: Path | None):
    from editflow.models import load_model

    path = model_path or DEFAULT_MODEL
    h = load_model(path, device="cpu")
    n = sum(p.numel() for p in h.model.parameters())
    return h.model, h.tokenizer, f"{path.name if model_path else 'bundled default model'} ({n:,} params)"


def mid_mlp_weight(model: torch.nn.Module) -> torch.nn.Parameter:
    """One mid-depth MLP output weight (the one a MEMIT edit would touch)."""
    names = [n for n, _ in model.named_parameters() if n.endswith(("mlp.c_proj.weight", "mlp.down_proj.weight"))]
    return dict(model.named_parameters())[names[len(names) // 2]]


#: Parts of an evaluation timed separately: (attribute of the evaluator module, part name).
PARTS = (
    ("known_mask", "known-fact selection"),
    ("greedy_answers", "pre-edit answers"),
    ("Evaluator._score", "scoring"),
    ("Evaluator._fluency", "fluency sampling"),
    ("drift_reference", "drift reference"),
    ("drift", "drift"),
)


def instrument(pkg) -> dict[str, float]:
    """Wrap the parts of ``pkg``'s evaluator in wall-clock timers; returns the totals (filled as it runs)."""
    module = importlib.import_module(pkg.__name__ + ".evaluator")
    totals: dict[str, float] = {}
    for attr, part in PARTS:
        owner, name = (module.Evaluator, attr.split(".")[1]) if "." in attr else (module, attr)
        if not hasattr(owner, name):
            continue

        def wrap(fn, part=part):
            def timed_part(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    totals[part] = totals.get(part, 0.0) + time.perf_counter() - t

            return timed_part

        setattr(owner, name, wrap(getattr(owner, name)))
    return totals


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def material(pkg, requests) -> dict:
    """Held-out text and fact candidates from the bundled files, with ``pkg``'s default count."""
    import inspect

    from editflow.evaluate.data import DEFAULT_HELDOUT_TEXT

    # like for like: the same held-out text for both, and fluency on every fact (no sampling cap)
    uncapped = {"fluency_max": 0} if "fluency_max" in inspect.signature(pkg.Evaluator).parameters else {}
    return {
        "heldout_texts": pkg.load_heldout_texts(DEFAULT_HELDOUT_TEXT),
        "heldout_facts": pkg.default_heldout_facts(requests, path=RECORDS),
        **uncapped,
    }


def evaluate(pkg, model, tok, requests) -> dict:
    """pre, post (perturbed model) with ``pkg``'s Evaluator and its default held-out material."""
    ev = pkg.Evaluator((model, tok), requests, **material(pkg, requests))
    pre, t_pre, c_pre = timed(ev.pre)
    w = mid_mlp_weight(model)
    saved = w.detach().clone()
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * float(saved.std())
    try:
        with torch.no_grad():
            w.add_(noise.to(w.device, w.dtype))  # a stand-in edit
        post, t_post, c_post = timed(ev.post)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    return {"ev": ev, "pre": pre, "post": post, "t_pre": t_pre, "t_post": t_post, "c_pre": c_pre, "c_post": c_post}


def cached_pre(pkg, model, tok, requests, state) -> tuple[float, float]:
    ev = pkg.Evaluator((model, tok), requests, **material(pkg, requests))
    with tempfile.TemporaryDirectory() as tmp:
        pkg.save_pre_state(state, tmp)
        _, t, c = timed(lambda: ev.pre(known=pkg.load_pre_state(tmp)))
    return t, c


def fitting_requests(tok, requests, model) -> tuple[list, int]:
    """The requests every probe of which fits the model's positions: the current evaluator leaves a
    longer prompt out (and counts it) where the reference scored it truncated, so both are compared on
    what both score."""
    from editflow.evaluate.probes import fitting_probes, request_probes
    from editflow.tokens import model_positions

    positions = model_positions(model)
    kept = [r for r in requests if fitting_probes(tok, request_probes(tok, [r]), positions)[1] == 0]
    return kept, len(requests) - len(kept)


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    keys = [k for k in a if k not in HELDOUT_KEYS]
    assert set(keys) == {k for k in b if k not in HELDOUT_KEYS}, set(keys) ^ {k for k in b if k not in HELDOUT_KEYS}
    worst = max(keys, key=lambda k: abs(a[k] - b[k]))
    return abs(a[worst] - b[worst]), worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="saved HF model folder (default: bundled model)")
    ap.add_argument("--limit", type=int, default=20, help="first N bundled CounterFact records")
    ap.add_argument("--reference-rev", default=REFERENCE_REV)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import editflow.evaluate as new

    with tempfile.TemporaryDirectory() as tmp:
        old = import_reference(args.reference_rev, Path(tmp))
    model, tok, which = load(args.model)
    requests, left_out = fitting_requests(tok, load_requests(RECORDS)[: args.limit], model)
    if left_out:
        print(f"{left_out} record(s) with a prompt longer than the model's positions left out", flush=True)
    print(f"model: {which}; records: {len(requests)}; torch threads: {torch.get_num_threads()}", flush=True)

    parts_old, parts_new = instrument(old), instrument(new)
    r_old = evaluate(old, model, tok, requests)
    r_new = evaluate(new, model, tok, requests)
    t_cached, c_cached = cached_pre(new, model, tok, requests, r_new["ev"].pre_state)
    d_pre, k_pre = max_diff(r_new["pre"].metrics, r_old["pre"].metrics)
    d_post, k_post = max_diff(r_new["post"].metrics, r_old["post"].metrics)

    def row(name: str, t_old: float, c_old: float, t_new: float, c_new: float) -> str:
        return (
            f"| {name} | {t_old:.1f} | {t_new:.1f} | {t_old / t_new:.1f}x | {c_old:.1f} | {c_new:.1f} | "
            f"{c_old / c_new:.1f}x |"
        )

    tot = [r_old["t_pre"] + r_old["t_post"], r_old["c_pre"] + r_old["c_post"]]
    table = "\n".join(
        [
            f"Model: {which}. Records: {len(requests)} bundled CounterFact. Device: cpu, {torch.get_num_threads()} "
            f"thread(s). Reference: editflow/evaluate at {args.reference_rev}. Held-out facts kept: "
            f"old {int(r_old['pre'].metrics['n_heldout'])}, new {int(r_new['pre'].metrics['n_heldout'])}.",
            "",
            "| evaluation | old wall (s) | new wall (s) | speed-up | old CPU (s) | new CPU (s) | CPU ratio |",
            "|---|---|---|---|---|---|---|",
            row("pre", r_old["t_pre"], r_old["c_pre"], r_new["t_pre"], r_new["c_pre"]),
            row("post", r_old["t_post"], r_old["c_post"], r_new["t_post"], r_new["c_post"]),
            row("pre + post", *tot, r_new["t_pre"] + r_new["t_post"], r_new["c_pre"] + r_new["c_post"]),
            row("pre (saved state) + post", *tot, t_cached + r_new["t_post"], c_cached + r_new["c_post"]),
            "",
            f"Max abs metric difference new vs old (held-out metrics excluded: new selection): pre {d_pre:.2e} "
            f"({k_pre}), post {d_post:.2e} ({k_post}). Loading the saved pre state: {t_cached:.2f} s.",
            "",
            "| part (pre + post, wall s) | old | new |",
            "|---|---|---|",
            *(f"| {part} | {parts_old.get(part, 0.0):.1f} | {parts_new.get(part, 0.0):.1f} |" for _, part in PARTS),
        ]
    )
    print(table)
    print("old pre:", json.dumps({k: round(v, 4) for k, v in r_old["pre"].metrics.items()}))
    print("new pre:", json.dumps({k: round(v, 4) for k, v in r_new["pre"].metrics.items()}))
    print("old post:", json.dumps({k: round(v, 4) for k, v in r_old["post"].metrics.items()}))
    print("new post:", json.dumps({k: round(v, 4) for k, v in r_new["post"].metrics.items()}))
    assert d_pre < 1e-4 and d_post < 1e-4, (d_pre, k_pre, d_post, k_post)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
