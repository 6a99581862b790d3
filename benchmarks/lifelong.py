"""Lifelong editing through the registry: V successive edit versions of N facts each, every one promoted.

For each version: its own batch's efficacy / paraphrase, retention of every earlier fact, held-out
known facts and held-out perplexity against the root base, fluency against the parent (on the
batch's prompts). At the last version: every batch's efficacy, and its neighbourhood beside the
root's on the same prompts; with ``--fluency``, fluency of the root and the last version on the same
seeded sample of all batches' facts. Two ways, in the same run: ``lineage`` (each version carries
the edit state of its lineage: what editflow does) and ``from-zero`` (each run starts with no
preserved keys: the behaviour before edit states existed).

    python benchmarks/lifelong.py [--model default|PATH.gguf] [--versions 6] [--facts 50]
        [--algorithm alphaedit] [--hparams k=v,...] [--ways lineage,from-zero] [--offset 0] [--fluency]
        [--records A.json,B.json]

zsRE batches report zsRE's efficacy, paraphrase and specificity (``loc``) in the ES, PS and NS columns.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from _records import without_evaluated_anchors  # noqa: E402
from _results import markdown_table, publish  # noqa: E402

from editflow import assets  # noqa: E402

#: Each table figure's metric: CounterFact's name first, then zsRE's (a mixed batch reports its CounterFact figure).
FIGURES = {
    "es": ("efficacy", "zsre_efficacy"),
    "ps": ("paraphrase", "zsre_paraphrase"),
    "ns": ("neighborhood", "zsre_specificity"),
}


def figure(metrics: dict[str, float], key: str, prefix: str = "") -> float | None:
    """The table's ``key`` figure from ``metrics`` (names under ``prefix``, e.g. ``"post/"``): the
    CounterFact metric, or the zsRE one where the batch has no CounterFact records."""
    return next((metrics[prefix + n] for n in FIGURES[key] if prefix + n in metrics), None)


def load_records(paths: str) -> list[dict]:
    """The records of the comma-separated JSON files ``paths``, in order, less those editflow refuses
    as edit requests (e.g. zsRE records whose new answer is the true one); says how many it left out."""
    from editflow.requests import RequestError, parse_record

    records = [r for p in paths.split(",") for r in json.loads(Path(p).read_text())]
    kept = []
    for i, r in enumerate(records):
        try:
            parse_record(r, i)
            kept.append(r)
        except RequestError:
            pass
    if len(kept) < len(records):
        print(
            f"lifelong: {len(records) - len(kept)} of {len(records)} records are not valid edits; left out",
            file=sys.stderr,
        )
    return kept


def batch_figures(handle, batch: Path) -> tuple[float, float]:
    """Efficacy and neighbourhood (zsRE: specificity) of ``handle`` on the facts of ``batch``."""
    from editflow.evaluate import Evaluator
    from editflow.requests import load_requests

    m = Evaluator(handle, load_requests(batch), n_auto_neighbors=0, fluency=False).pre().metrics
    es, ns = figure(m, "es"), figure(m, "ns")
    return float("nan") if es is None else es, float("nan") if ns is None else ns


def run_way(way: str, args: argparse.Namespace, batches: list[Path]) -> tuple[list[dict], list[dict], float]:
    """Edit the batches one after another in a fresh store; per-version figures and, per batch, the
    last version's efficacy and neighbourhood with the root's neighbourhood on the same prompts."""
    from editflow.commands._options import parse_hparams
    from editflow.evaluate.fluency import fact_fluency
    from editflow.pipeline import EditJob, run_edit
    from editflow.registry.promotion import GateThresholds
    from editflow.registry.store import Registry
    from editflow.registry.versions import load_version
    from editflow.requests import load_requests

    root = Path(tempfile.mkdtemp(prefix=f"lifelong-{way}-"))
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    hparams = {**parse_hparams(args.hparams), "algorithm": args.algorithm}
    rows, name, t0 = [], None, time.perf_counter()
    for k, batch in enumerate(batches):
        model = "" if k == 0 and args.model == "default" else (args.model if k == 0 else f"models:/{name}@production")
        job = EditJob(
            requests=str(batch),
            model=model,
            hparams=hparams,
            promote="always",
            thresholds=GateThresholds.measuring(),
            fluency=args.fluency,
            carry_state=(way == "lineage"),
            stats_tokens=args.stats_tokens or None,
        )
        out = run_edit(job)
        name = out.name
        m = out.metrics
        rows.append(
            {
                "version": out.version,
                "es": figure(m, "es", "post/"),
                "ps": figure(m, "ps", "post/"),
                "retention": m.get("post/retention"),
                "heldout": m.get("post/heldout"),
                "heldout_root": m.get("pre/heldout") if k == 0 else rows[0]["heldout_root"],
                "ppl": m.get("post/drift_ppl"),
                "ppl_root": m.get("pre/drift_ppl") if k == 0 else rows[0]["ppl_root"],
                "ns": figure(m, "ns", "post/"),
                "ns_pre": figure(m, "ns", "pre/"),
                "fluency": m.get("post/fluency"),
                "fluency_parent": m.get("pre/fluency"),
            }
        )
    reg = Registry()
    last = load_version(reg, name, "@production")
    root = load_version(reg, name, last_root_version(reg, name)).handle
    final = [
        {"es": es, "ns": ns, "ns_root": batch_figures(root, b)[1]}
        for b in batches
        for es, ns in [batch_figures(last.handle, b)]
    ]
    if args.fluency:  # root and last version on the same prompts: a seeded sample of all batches' facts
        facts = [r for b in batches for r in load_requests(b)]
        facts = [facts[i] for i in sorted(random.Random(0).sample(range(len(facts)), min(FLUENCY_FACTS, len(facts))))]
        last_flu = fact_fluency(last.handle.model, last.handle.tokenizer, facts).to_numpy()  # (facts,)
        root_flu = fact_fluency(root.model, root.tokenizer, facts).to_numpy()
        rel = 100 * (last_flu - root_flu) / root_flu.mean()  # per fact, in % of the root's mean
        rows[-1]["fluency_same"] = (
            float(root_flu.mean()),
            float(last_flu.mean()),
            float(rel.std(ddof=1) / len(rel) ** 0.5),
            len(rel),
        )
    return rows, final, time.perf_counter() - t0


#: Facts the last version's fluency is compared with the root's on (seeded sample over all batches).
FLUENCY_FACTS = 50


def last_root_version(reg, name: str) -> int:
    """The root base version of ``name``'s production lineage."""
    from editflow.registry.schema import BASE_VERSION_TAG
    from editflow.registry.versions import resolve_version, tags_of

    return int(tags_of(reg, name, resolve_version(reg, name, "@production"))[BASE_VERSION_TAG])


def mean_gap(final: list[dict]) -> float:
    """Mean over batches of the last version's neighbourhood minus the root's."""
    return sum(f["ns"] - f["ns_root"] for f in final) / len(final)


def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def table(way: str, rows: list[dict], final: list[dict], seconds: float, args: argparse.Namespace) -> str:
    lines = []
    for r in rows:
        ppl_rel = None if r["ppl"] is None or not r["ppl_root"] else 100 * (r["ppl"] / r["ppl_root"] - 1)
        ho = None if r["heldout"] is None or r["heldout_root"] is None else r["heldout"] - r["heldout_root"]
        flu = (
            None if r["fluency"] is None or not r["fluency_parent"] else 100 * (r["fluency"] / r["fluency_parent"] - 1)
        )
        lines.append(
            f"| v{r['version']} | {fmt(r['es'])} | {fmt(r['ps'])} | {fmt(r['retention'])} | "
            f"{fmt(r['ns'])} ({fmt(r['ns_pre'])}) | {fmt(ho)} | {fmt(ppl_rel)} % | {fmt(flu)} % |"
        )
    caption = (
        f"**{way}** — {args.model}, {args.algorithm}"
        + (f" + `{args.hparams}`" if args.hparams else "")
        + f", {len(rows)} versions × {args.facts} facts, "
        f"{seconds / 60:.1f} min; efficacy of each batch at the last version: "
        + " / ".join(fmt(f["es"]) for f in final)
        + "; neighbourhood of each batch at the last version (root): "
        + " / ".join(f"{fmt(f['ns'])} ({fmt(f['ns_root'])})" for f in final)
        + f", mean {mean_gap(final):+.1f} points vs root"
    )
    if rows and "fluency_same" in rows[-1]:
        root, last, se, n = rows[-1]["fluency_same"]
        caption += (
            f"; fluency on the same {n} facts of all batches, root → last version: "
            f"{root:.1f} → {last:.1f} ({100 * (last / root - 1):+.1f} % ± {se:.1f}, paired standard error)"
        )
    header = [
        "version",
        "own ES",
        "own PS",
        "retention",
        "NS (pre)",
        "held-out vs root",
        "ppl vs root",
        "fluency vs parent",
    ]
    return markdown_table(caption, header, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--versions", type=int, default=6)
    ap.add_argument("--facts", type=int, default=50)
    ap.add_argument("--algorithm", default="memit", help="memit (the workflow's default) or alphaedit")
    ap.add_argument("--hparams", default="")
    ap.add_argument("--ways", default="lineage,from-zero")
    ap.add_argument("--stats-tokens", type=int, default=0)
    ap.add_argument(
        "--records",
        default=str(assets.counterfact_records_path()),
        help="Record files, comma-separated (CounterFact or zsRE; e.g. ../shared/data/zsre/zsre_sample.json).",
    )
    ap.add_argument("--offset", type=int, default=0, help="First record used.")
    ap.add_argument("--fluency", action="store_true", help="Also measure fluency (slower).")
    args = ap.parse_args()
    records = without_evaluated_anchors(load_records(args.records))[args.offset :]
    need = args.versions * args.facts
    if len(records) < need:
        raise SystemExit(
            f"error: {args.versions} × {args.facts} facts need {need} records, {args.records} has {len(records)}"
        )
    tmp = Path(tempfile.mkdtemp(prefix="lifelong-batches-"))
    batches = []
    for k in range(args.versions):
        path = tmp / f"batch{k}.json"
        path.write_text(json.dumps(records[k * args.facts : (k + 1) * args.facts]))
        batches.append(path)
    parts = []
    for way in args.ways.split(","):
        rows, final, seconds = run_way(way, args, batches)
        parts.append(table(way, rows, final, seconds, args))
    publish(f"lifelong_{Path(args.model).stem}_{args.algorithm}.md", "\n\n".join(parts))


if __name__ == "__main__":
    main()
