"""One edit batch, end to end: the library call behind both ``editflow edit`` and the MLflow project.

resolve base → parse requests → covariances (cache or one pass) → evaluate before → MEMIT/AlphaEdit
→ evaluate after (per chunk in sequential mode) → log to MLflow → register a new version → gate and
promote. Any failure before registration ends the run FAILED and registers nothing.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editflow import memit
from editflow.config import MemitConfig
from editflow.requests import EditRequest, check_tokenizable, load_requests, requests_digest
from editflow.registry import flavor, ledger, promotion, resolve
from editflow.registry.store import configure, ensure_experiment
from editflow.registry.versions import CANDIDATE, TAG, VersionRef, log_and_register, set_alias

PROMOTE_CHOICES = ("never", "if-better", "always")
STORAGE_CHOICES = ("delta", "full")
HEADLINE = ("efficacy", "paraphrase", "neighborhood", "neighborhood_auto", "heldout", "score", "drift_ppl_rel")


@dataclass
class EditJob:
    """Everything one edit batch needs; strings as they come from the command line are fine."""

    requests: str
    model: str = ""
    registered_model: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    corpus: str = "bundled"
    stats_tokens: int | None = None
    stats_cache: str | None = None
    promote: str = "if-better"
    thresholds: promotion.GateThresholds = field(default_factory=promotion.GateThresholds)
    storage: str = "delta"
    device: str | None = None
    dtype: str | None = None
    fluency: bool = True
    description: str = ""
    fail_after: str | None = None  # test hook: raise after this phase ("edit", "eval", "log")

    def __post_init__(self) -> None:
        if self.promote not in PROMOTE_CHOICES:
            raise ValueError(f"promote must be one of {PROMOTE_CHOICES}, got {self.promote!r}")
        if self.storage not in STORAGE_CHOICES:
            raise ValueError(f"storage must be one of {STORAGE_CHOICES}, got {self.storage!r}")
        if self.stats_tokens is not None and int(self.stats_tokens) <= 0:
            raise ValueError("stats_tokens must be positive")


@dataclass
class EditOutcome:
    run_id: str
    name: str
    version: int
    parent_version: int | None
    metrics: dict[str, float]
    promoted: bool
    gate: promotion.GateResult
    promotion_error: str | None = None


class InjectedFailure(RuntimeError):
    """Raised by ``EditJob.fail_after`` (failure-injection tests)."""


def _maybe_fail(job: EditJob, phase: str) -> None:
    if job.fail_after == phase:
        raise InjectedFailure(f"injected failure after {phase}")


def _peak_memory_mb() -> float:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


def _start_run():
    import mlflow

    configure()
    if mlflow.active_run() is None:
        import os

        if not os.environ.get("MLFLOW_RUN_ID"):
            mlflow.set_experiment(experiment_id=ensure_experiment())
    return mlflow.start_run()


def run_edit(job: EditJob) -> EditOutcome:
    """Run one edit batch as an MLflow run and register the edited model as a new version."""
    import mlflow

    with _start_run() as run:
        run_id = run.info.run_id
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        requests = load_requests(job.requests)
        base = resolve.resolve_base(job.model, device=job.device, dtype=job.dtype)
        name = job.registered_model or resolve.default_registered_name(base)
        base = resolve.ensure_registered_base(base, name)
        handle = base.handle
        check_tokenizable(requests, handle.tokenizer)
        config = resolve.config_for(base, job.hparams)
        timings["load"] = time.perf_counter() - t0
        _log_inputs(job, base, config, requests)

        t0 = time.perf_counter()
        covs = _covariances(job, base, config, run_id)
        timings["stats"] = time.perf_counter() - t0

        from editflow.evaluate import Evaluator, default_heldout_facts, load_heldout_texts

        t0 = time.perf_counter()
        evaluator = Evaluator(handle, requests, heldout_texts=load_heldout_texts(),
                              heldout_facts=default_heldout_facts(requests), fluency=job.fluency,
                              seed=config.seed)
        pre = evaluator.pre()
        mlflow.log_metrics({k: float(v) for k, v in pre.summary.items()})
        timings["eval_pre"] = time.perf_counter() - t0

        post_results = []

        def on_chunk(index: int, chunk: list[EditRequest], _diags: list) -> None:
            if config.mode == "sequential":
                result = evaluator.post(step=index)
                post_results.append(result)
                mlflow.log_metrics({f"chunk/{k}": float(v) for k, v in result.metrics.items()}, step=index)

        result = memit.edit(handle.model, handle.tokenizer, handle.adapter, requests, covs, config,
                            on_chunk=on_chunk, keep_applied=True)
        timings.update({f"edit_{k}": v for k, v in result.timings.items()})
        _maybe_fail(job, "edit")

        t0 = time.perf_counter()
        post = post_results[-1] if post_results else evaluator.post()
        timings["eval_post"] = time.perf_counter() - t0
        _maybe_fail(job, "eval")

        metrics = {**pre.summary, **post.summary}
        mlflow.log_metrics({k: float(v) for k, v in post.summary.items()})
        mlflow.log_metrics({f"time/{k}": v for k, v in timings.items()})
        mlflow.log_metric("memory/peak_rss_mb", _peak_memory_mb())
        if torch.cuda.is_available():
            mlflow.log_metric("memory/peak_cuda_mb", torch.cuda.max_memory_allocated() / 2**20)
        _log_artifacts(job, requests, evaluator, pre, post, result)
        _maybe_fail(job, "log")

        verdict = promotion.gate(metrics, job.thresholds)
        version = _register(job, name, base, handle, requests, config, metrics, run_id)
        promoted, error = False, None
        if job.promote == "always" or (job.promote == "if-better" and verdict.passed):
            try:
                promotion.promote(name, version, reason=f"run {run_id}: promote={job.promote}", run_id=run_id)
                promoted = True
            except Exception as exc:  # the version stays a candidate; production is unchanged
                error = f"{type(exc).__name__}: {exc}"
                mlflow.set_tag(TAG + "promotion_error", error)
        mlflow.set_tags({TAG + "gate": "passed" if verdict.passed else "failed: " + "; ".join(verdict.reasons),
                         TAG + "promoted": str(promoted).lower()})
        return EditOutcome(run_id, name, version, base.version, metrics, promoted, verdict, error)


def _log_inputs(job: EditJob, base: VersionRef, config: MemitConfig, requests: list[EditRequest]) -> None:
    import mlflow

    params = {f"hp.{k}": (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in config.to_dict().items()}
    # Names are namespaced: `mlflow run` logs the raw project parameters under their own names.
    params.update({"edit.algorithm": config.algorithm, "edit.mode": config.mode, "base.model": base.uri,
                   "base.fingerprint": base.fingerprint, "stats.corpus": job.corpus,
                   "stats.tokens": resolve.stats_tokens(base, job.stats_tokens),
                   "requests.file": Path(job.requests).name, "requests.digest": requests_digest(requests),
                   "requests.count": len(requests), "registry.storage": job.storage, "gate.promote": job.promote,
                   "edit.device": str(base.handle.device),
                   "gate.min_efficacy": job.thresholds.min_efficacy,
                   "gate.max_specificity_drop": job.thresholds.max_specificity_drop,
                   "gate.max_ppl_increase": job.thresholds.max_ppl_increase})
    mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
    mlflow.log_artifact(job.requests, "inputs")


def _covariances(job: EditJob, base: VersionRef, config: MemitConfig, run_id: str) -> dict[int, torch.Tensor]:
    """Per-layer covariances from the cache or one pass; log npz+manifest when computed here, else the
    manifest and the run that produced it."""
    import mlflow

    from editflow.stats import CorpusSpec, layer_covariances

    spec = CorpusSpec(source=job.corpus)
    # C is a property of the unedited model (as in the MEMIT/AlphaEdit papers): an edited version's
    # rewrite weights are swapped back to the root base's for the pass, so the whole lineage shares
    # one cache entry per layer.
    original = (flavor.read_tensors(base.base_artifact_uri, base.edited_tensors)
                if base.edited_tensors and base.base_artifact_uri else {})
    backup = memit.set_weights(base.handle.model, original)
    try:
        res = layer_covariances(base.handle, list(config.layers), spec, resolve.stats_tokens(base, job.stats_tokens),
                                dtype=config.mom2_dtype, seed=config.seed, cache_dir=job.stats_cache)
    finally:
        memit.restore(base.handle.model, backup)
    with tempfile.TemporaryDirectory() as tmp:
        for entry in res.entries:
            key = entry.manifest.get("key_digest") or Path(entry.path).stem
            tag = f"{TAG}stats.{str(key)[:32]}"
            manifest = dict(entry.manifest)
            if entry.hit:
                producer = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{tag}` = 'computed'",
                                              max_results=1, output_format="list")
                manifest["produced_by_run"] = producer[0].info.run_id if producer else None
            else:
                mlflow.set_tag(tag, "computed")
                mlflow.log_artifact(str(entry.path), "stats")
                manifest["produced_by_run"] = run_id
            path = Path(tmp) / f"{Path(entry.path).stem}.manifest.json"
            path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            mlflow.log_artifact(str(path), "stats")
    return {layer: c for layer, c in res.covs.items()}


def _log_artifacts(job: EditJob, requests: list[EditRequest], evaluator: Any, pre: Any, post: Any,
                   result: memit.EditResult) -> None:
    import mlflow

    from editflow.evaluate import fact_table, history_frame, plot_curve, plot_probabilities

    table = fact_table(requests, pre, post)
    mlflow.log_table(table.reset_index(drop=True).astype({c: str for c in table.columns if table[c].dtype == object}),
                     "eval/facts.json")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        table.to_csv(out / "facts.csv", index=False)
        plot_probabilities(table, out / "prob_new_pre_vs_post.png")
        if len(evaluator.history) > 1:
            plot_curve(history_frame(evaluator.history), out / "chunk_curve.png")
        (out / "layer_update_norms.json").write_text(json.dumps(result.layer_update_norms, indent=2))
        (out / "diagnostics.json").write_text(json.dumps([d.__dict__ for d in result.diagnostics], indent=2))
        (out / "context_templates.json").write_text(json.dumps(result.context_templates, indent=2))
        mlflow.log_artifacts(str(out), "eval")
    for name, norm in result.layer_update_norms.items():
        mlflow.log_metric(f"update_norm/{name}", norm)


def _register(job: EditJob, name: str, base: VersionRef, handle: Any, requests: list[EditRequest],
              config: MemitConfig, metrics: dict[str, float], run_id: str) -> int:
    from editflow.models import fingerprint

    digest = requests_digest(requests)
    edited = sorted(set(base.edited_tensors) | {handle.adapter.rewrite_weight(layer) for layer in config.layers})
    lineage = {"base_version": base.base_version, "parent_version": base.version,
               "base_artifact_uri": base.base_artifact_uri, "base_model_uri": f"models:/{name}/{base.base_version}",
               "requests_digest": digest, "n_facts": len(requests), "run_id": run_id,
               "hparams": config.to_dict(), "model_defaults": base.handle.extra.get("model_defaults", {})}
    headline = {f"{TAG}metric.{k}": f"{metrics[f'post/{k}']:.2f}" for k in HEADLINE if f"post/{k}" in metrics}
    tags = {TAG + "role": "edit", TAG + "parent_version": str(base.version), TAG + "base_version": str(base.base_version),
            TAG + "requests_digest": digest, TAG + "n_facts": str(len(requests)), TAG + "algorithm": config.algorithm,
            TAG + "mode": config.mode, TAG + "run_id": run_id, TAG + "storage": job.storage,
            TAG + "fingerprint": fingerprint(handle.model), **headline}
    description = job.description or (
        f"{len(requests)} facts edited into v{base.version} with {config.algorithm} ({config.mode}); "
        + ", ".join(f"{k.split('.')[-1]} {v}" for k, v in headline.items()))

    def on_registered(version: int) -> None:
        set_alias(name, CANDIDATE, version)
        ledger.record_facts(name, version, requests, digest, run_id)
        ledger.record_event(name, "register", version, parent_version=base.version, run_id=run_id,
                            reason=f"{len(requests)} facts, {config.algorithm}/{config.mode}")

    return log_and_register(name, handle, storage=job.storage, edited_tensors=edited if job.storage == "delta" else (),
                            lineage=lineage, tags=tags, description=description, on_registered=on_registered)
