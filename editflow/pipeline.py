"""One edit batch, end to end: the library call behind both ``editflow edit`` and the MLflow project.

resolve base → parse requests → covariances (cache or one pass) → evaluate before → MEMIT/AlphaEdit
→ evaluate after (per chunk in sequential mode) → log to MLflow → register a new version → gate and
promote. Any failure before registration ends the run FAILED and registers nothing.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editflow import memit, progress
from editflow.config import MemitConfig
from editflow.edit_state import EditState
from editflow.job_options import PROMOTE_CHOICES, STORAGE_CHOICES
from editflow.models import with_module_overrides
from editflow.registry import flavor, integrity, ledger, lineage, promotion, resolve
from editflow.registry.schema import (
    BASE_ARTIFACT_URI_KEY,
    BASE_MODEL_URI_KEY,
    BASE_VERSION_KEY,
    BASE_VERSION_TAG,
    CANDIDATE,
    EDIT_STATE_KEY,
    ERROR_TAG,
    FINGERPRINT_KEY,
    FINGERPRINT_TAG,
    GATE_TAG,
    HPARAMS_KEY,
    MODEL_DEFAULTS_KEY,
    N_FACTS_KEY,
    N_FACTS_TAG,
    PARENT_VERSION_KEY,
    PARENT_VERSION_TAG,
    PROMOTED_TAG,
    PROMOTION_ERROR_TAG,
    REQUESTS_DIGEST_KEY,
    ROLE_EDIT,
    ROLE_TAG,
    ROOT_REFERENCES_KEY,
    RUN_ID_KEY,
    metric_tag,
    stats_tag,
)
from editflow.registry.store import Registry
from editflow.registry.versions import (
    VersionRef,
    check_model_name,
    log_and_register,
    record_gate,
    retry,
    set_alias,
    tags_of,
)
from editflow.requests import (
    MAX_REQUESTS,
    EditRequest,
    check_lengths,
    check_tokenizable,
    context_template_allowance,
    load_requests,
    requests_digest,
)
from editflow.tokens import model_positions

HEADLINE = (
    "efficacy",
    "paraphrase",
    "neighborhood",
    "neighborhood_auto",
    "heldout",
    "score",
    "drift_ppl_rel",
    "retention",
)
#: The headline figures also kept as version tags (``editflow.metric.<name>``); the others are in the
#: description and the run.
HEADLINE_TAGS = ("efficacy", "neighborhood", "drift_ppl_rel", "retention")
#: Figures logged with the version number as the step.
LINEAGE_CURVE = ("efficacy", "paraphrase", "neighborhood", "heldout", "drift_ppl", "retention", "retention_top1")


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
    carry_state: bool = True  # edit from the lineage's edit state (False: preserve nothing earlier)
    max_requests: int = MAX_REQUESTS
    description: str = ""

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


def _peak_memory_mb() -> float:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


@contextlib.contextmanager
def timed(name: str, timings: dict[str, float], what: str | None = None) -> Iterator[None]:
    """Time one phase into ``timings[name]``, announcing it on stderr (``what``: its plain name)."""
    progress.note(f"editflow: {what or name} …")
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def experiment_name(job: EditJob) -> str:
    """The experiment an edit run goes to: the registered model's name (known before any loading)."""
    from editflow.registry.store import DEFAULT_MODEL_NAME
    from editflow.registry.versions import parse_models_uri

    if job.registered_model:
        return job.registered_model
    if not job.model or job.model == "default":
        return DEFAULT_MODEL_NAME
    if job.model.startswith("models:/"):
        return parse_models_uri(job.model)[0]
    return resolve.registered_name_for(job.model)


def _start_run(reg: Registry, job: EditJob):
    """The MLflow run of this edit: the one ``mlflow run`` started, else a new run in the registered
    model's experiment (fluent API: ``reg`` pointed it at its store when it was built)."""
    import os

    import mlflow

    if mlflow.active_run() is None and not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment_id=reg.ensure_experiment(experiment_name(job)))
    return mlflow.start_run()


@dataclass
class _Plan:
    """What the load phase resolved: the requests, the registered base, its config and lineage state."""

    requests: list[EditRequest]
    base: VersionRef
    name: str
    config: MemitConfig
    parent_tags: dict[str, str]
    parent_meta: dict[str, Any]  # the parent version's editflow.json (empty for a base from a folder)
    state: EditState
    state_sha256: str | None
    held: list[EditRequest]  # the facts the lineage holds before this batch (from its versions' runs)

    @property
    def handle(self) -> Any:
        return self.base.handle


def run_edit(job: EditJob, reg: Registry | None = None) -> EditOutcome:
    """Run one edit batch as an MLflow run in ``reg``'s store (default: a :class:`Registry` of the
    environment's store, built here for this job) and register the edited model as a new version.

    A failure ends the run FAILED with the error as the ``editflow.error`` tag and the traceback as the
    artifact ``error/traceback.txt``, and is raised again.
    """
    reg = reg or Registry()
    _ = reg.ledger_uri  # a tracking server with no ledger named refuses here, before any run or upload
    with _start_run(reg, job) as run:
        integrity.claim_run()  # a killed run is recognised as orphaned by its dead owner process
        try:
            return _run_phases(reg, job, run.info.run_id)
        except BaseException as exc:
            _record_failure(exc)
            raise


def _record_failure(exc: BaseException) -> None:
    """Keep a failed run's error where people look: a tag and a traceback artifact (best effort)."""
    import traceback

    import mlflow

    try:
        mlflow.set_tag(ERROR_TAG, f"{type(exc).__name__}: {exc}"[:4000])
        mlflow.log_text("".join(traceback.format_exception(exc)), "error/traceback.txt")
    except Exception:  # noqa: BLE001 - the store may be what failed; the original error matters more
        pass


def _run_phases(reg: Registry, job: EditJob, run_id: str) -> EditOutcome:
    """The phases of one edit run, in order (see the module docstring)."""
    timings: dict[str, float] = {}
    with timed("load", timings, "loading requests and the base model"):
        plan = _resolve(reg, job)
    _log_inputs(job, plan.base, plan.config, plan.requests)
    with timed("stats", timings, "layer statistics"):
        covs = _covariances(reg, job, plan.base, plan.config, run_id)
    integrity.crashpoint("after_stats")
    with timed("eval_pre", timings, "evaluating before the edit"):
        evaluator = _evaluator(reg, job, plan)
        pre = _evaluate_pre(evaluator, plan)
    _log_pre(pre.summary)
    with timed("edit", timings, f"editing {len(plan.requests)} facts ({plan.config.algorithm}, {plan.config.mode})"):
        result, chunk_results = _edit(job, plan, covs, evaluator)
    timings.update({f"edit_{k}": v for k, v in result.timings.items()})
    integrity.crashpoint("after_edit")
    with timed("eval_post", timings, "evaluating after the edit"):
        post = chunk_results[-1] if chunk_results and not plan.config.repair_steps else evaluator.post()
        retention = _retention(plan)

    metrics = {**pre.summary, **post.summary, **{f"post/{k}": v for k, v in retention.items()}}
    if result.layer_update_ratios:
        metrics["post/max_update_ratio"] = max(result.layer_update_ratios.values())
    if result.layer_output_ratios:
        metrics["post/max_output_ratio"] = max(result.layer_output_ratios.values())
    _log_results(metrics, timings)
    _log_artifacts(job, plan.requests, evaluator, pre, post, result)

    root = lineage.root_references(plan.parent_tags, plan.parent_meta, pre.summary)
    verdict = promotion.gate(metrics, job.thresholds, root)
    with timed("register", timings, f"registering a new version of {plan.name}"):
        state_record = _log_lineage(plan, result)
        version = _register(
            reg,
            job,
            plan.name,
            plan.base,
            plan.handle,
            plan.requests,
            plan.config,
            metrics,
            run_id,
            {EDIT_STATE_KEY: lineage.state_entry(state_record), ROOT_REFERENCES_KEY: root},
        )
    _log_lineage_curve(metrics, version)
    promoted, error = _promote(reg, job, plan.name, version, verdict, run_id)
    _name_run(len(plan.requests), plan.name, version, promoted)
    return EditOutcome(run_id, plan.name, version, plan.base.version, metrics, promoted, verdict, error)


def _resolve(reg: Registry, job: EditJob) -> _Plan:
    """Requests, the base, its config and edit state; every check on the requests runs before a new
    base is registered or any model work is done."""
    requests = load_requests(job.requests, max_requests=job.max_requests)
    MemitConfig().replace(**job.hparams)  # unknown or bad overrides fail before the default model is registered
    base = resolve.resolve_base(
        reg, job.model, device=job.device, dtype=job.dtype, registered_model=job.registered_model
    )
    tokenizer = base.handle.tokenizer
    check_tokenizable(requests, tokenizer)
    config = resolve.config_for(reg, base, job.hparams)
    check_lengths(
        requests,
        tokenizer,
        model_positions(base.handle.model),
        context_template_allowance(config.context_templates, config.context_template_length),
    )
    base.handle = with_module_overrides(base.handle, config.layer_tmp, config.rewrite_tmp)
    name = check_model_name(job.registered_model or resolve.default_registered_name(base))
    _repair(reg, name)
    base = resolve.ensure_registered_base(reg, base, name)
    config = resolve.config_for(reg, base, job.hparams)  # a newly registered base: its stored tune result
    parent_tags = tags_of(reg, name, base.version)
    parent_meta = base.handle.extra.get(flavor.FLAVOR_NAME) or {}
    # the lineage's edit state is read now, so that a missing or damaged one fails before any work
    state, sha = lineage.read_state(reg, parent_tags, parent_meta) if job.carry_state else (EditState(), None)
    held = lineage.lineage_requests(reg, name, base.version)
    return _Plan(requests, base, name, config, parent_tags, parent_meta, state, sha, held)


def _repair(reg: Registry, name: str) -> None:
    """Finish what a killed process left on this model (promotion intents, pending versions, runs)."""
    from editflow.registry.versions import versions_of

    if versions_of(reg, name, include_pending=True):
        integrity.repair(reg, name)


def _evaluator(reg: Registry, job: EditJob, plan: _Plan) -> Any:
    """The evaluator of this batch, with the held-out facts the lineage's root base knows."""
    from editflow.evaluate import Evaluator, default_heldout_facts, drift_texts

    return Evaluator(
        plan.handle,
        plan.requests,
        # drift: text about no subject of this batch or of the lineage's earlier edits
        heldout_texts=drift_texts([*plan.requests, *plan.held]),
        # held-out: not in this batch and never edited anywhere in the lineage
        heldout_facts=default_heldout_facts([*plan.requests, *plan.held]),
        known_texts=_root_known_facts(reg, plan),
        fluency=job.fluency,
        seed=plan.config.seed,
    )


def _root_known_facts(reg: Registry, plan: _Plan) -> list[str]:
    """The bundled facts the root base knows, selected once per root and cached in MLflow, so every
    version's held-out figure is measured on the same facts (and can be compared with the root's)."""
    from editflow.evaluate import default_heldout_facts, find_known, known_key, log_known, select_known

    candidates = default_heldout_facts([])
    root_fp = tags_of(reg, plan.name, plan.base.base_version).get(FINGERPRINT_TAG) or plan.base.fingerprint
    key = known_key(root_fp, candidates)
    known = find_known(key)
    if known is None:
        known = select_known(plan.handle.model, plan.handle.tokenizer, candidates)
        if plan.base.version == plan.base.base_version:  # selected on the root itself: keep it
            log_known(known, key)
    return known


def _evaluate_pre(evaluator: Any, plan: _Plan) -> Any:
    """The pre-edit evaluation, reused when this base was already evaluated on the same requests."""
    from editflow.evaluate import find_pre_state, log_pre_state

    key = evaluator.pre_key(plan.base.fingerprint)
    state = find_pre_state(key)
    pre = evaluator.pre(known=state)
    if state is None:
        log_pre_state(evaluator.pre_state, key)
    return pre


def _edit(
    job: EditJob, plan: _Plan, covs: dict[int, torch.Tensor], evaluator: Any
) -> tuple[memit.EditResult, list[Any]]:
    """MEMIT/AlphaEdit over the batch, preserving the lineage's earlier edits; per-chunk evaluation in
    sequential mode."""
    import mlflow

    chunk_results: list[Any] = []

    def on_chunk(index: int, _chunk: list[EditRequest], _diags: list) -> None:
        if plan.config.mode == "sequential":
            result = evaluator.post(step=index)
            chunk_results.append(result)
            mlflow.log_metrics({f"chunk/{k}": float(v) for k, v in result.metrics.items()}, step=index)

    adapter = plan.handle.adapter
    preserved = plan.state.preserved(list(plan.config.layers), adapter.d_ff) if plan.state.layers else None
    result = memit.edit(
        plan.handle.model,
        plan.handle.tokenizer,
        adapter,
        plan.requests,
        covs,
        plan.config,
        on_chunk=on_chunk,
        keep_applied=True,
        preserved=preserved,
    )
    return _repair_solve(job, plan, covs, result, preserved), chunk_results


#: Statistics-corpus documents the repair's KL term samples from.
REPAIR_DOCUMENTS = 1024


def _repair_solve(
    job: EditJob,
    plan: _Plan,
    covs: dict[int, torch.Tensor],
    result: memit.EditResult,
    preserved: dict[int, torch.Tensor] | None,
) -> memit.EditResult:
    """The optional repair after the solve (``repair_steps`` > 0), KL-anchored on the job's statistics corpus."""
    if not plan.config.repair_steps:
        return result
    from editflow import repair
    from editflow.stats.corpus import CorpusSpec, Sampling, sample_documents

    docs = sample_documents(CorpusSpec(source=job.corpus), Sampling(seed=plan.config.seed))
    corpus = repair.corpus_documents(docs, plan.handle.tokenizer, REPAIR_DOCUMENTS)
    return repair.repair(
        plan.handle.model,
        plan.handle.tokenizer,
        plan.handle.adapter,
        plan.requests,
        result,
        covs,
        plan.config,
        corpus,
        preserved,
        earlier=lineage.earlier_facts(plan.held, plan.requests, seed=plan.config.seed)[0],
    )


def _retention(plan: _Plan) -> dict[str, float]:
    """Retention of the facts earlier versions of the lineage hold (capped, seeded sample)."""
    from editflow.evaluate.retention import retention_metrics

    earlier, total = lineage.earlier_facts(plan.held, plan.requests, seed=plan.config.seed)
    return retention_metrics(plan.handle, earlier, total, seed=plan.config.seed)


def prepost_metrics(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``prepost/<name>`` for every figure measured both before and after, as (step 0 = pre, step 1 =
    post): one metric per figure, so the MLflow UI charts pre and post on one line."""
    names = sorted(k[len("pre/") :] for k in metrics if k.startswith("pre/") and "post/" + k[len("pre/") :] in metrics)
    return (
        {f"prepost/{n}": float(metrics["pre/" + n]) for n in names},
        {f"prepost/{n}": float(metrics["post/" + n]) for n in names},
    )


def _log_pre(summary: dict[str, float]) -> None:
    """The pre-edit figures, as soon as they are known (a run that fails later still shows them)."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in summary.items()})


def _log_results(metrics: dict[str, float], timings: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k.startswith("post/")})
    for step, values in enumerate(prepost_metrics(metrics)):
        mlflow.log_metrics(values, step=step)
    mlflow.log_metrics({f"time/{k}": v for k, v in timings.items()})
    mlflow.log_metric("memory/peak_rss_mb", _peak_memory_mb())
    if torch.cuda.is_available():
        mlflow.log_metric("memory/peak_cuda_mb", torch.cuda.max_memory_allocated() / 2**20)


def _log_lineage(plan: _Plan, result: memit.EditResult) -> dict:
    """Log the batch's facts and the lineage's edit state extended by this batch's keys."""
    import mlflow

    lineage.log_facts(plan.requests)
    state = plan.state.extended(result.keys)
    record = lineage.log_state(state, plan.config.state_dtype, plan.state_sha256)
    mlflow.log_metrics({"edit_state/bytes": record["bytes"], "edit_state/n_keys": record["n_keys"]})
    return record


def _log_lineage_curve(metrics: dict[str, float], version: int) -> None:
    """Headline figures with the version number as the step (the lineage curve in the MLflow UI)."""
    import mlflow

    curve = {f"lineage/{k}": metrics[f"post/{k}"] for k in LINEAGE_CURVE if f"post/{k}" in metrics}
    mlflow.log_metrics(curve, step=version)


def _promote(
    reg: Registry, job: EditJob, name: str, version: int, verdict: promotion.GateResult, run_id: str
) -> tuple[bool, str | None]:
    """Promote per ``job.promote`` and the gate; a failed promotion leaves production where it was."""
    import mlflow

    promoted, error = False, None
    if job.promote == "always" or (job.promote == "if-better" and verdict.passed):
        try:
            promotion.promote(reg, name, version, reason=f"run {run_id}: promote={job.promote}", run_id=run_id)
            promoted = True
        except Exception as exc:  # the version stays a candidate; production is unchanged
            error = f"{type(exc).__name__}: {exc}"
            mlflow.set_tag(PROMOTION_ERROR_TAG, error)
    mlflow.set_tags(
        {
            GATE_TAG: "passed" if verdict.passed else "failed: " + "; ".join(verdict.reasons),
            PROMOTED_TAG: str(promoted).lower(),
        }
    )
    record_gate(reg, name, version, verdict.passed, verdict.reasons, promoted)
    return promoted, error


def _name_run(n_facts: int, name: str, version: int, promoted: bool) -> None:
    """A run name that says what happened, e.g. ``edit 10 facts → editflow-default v2 (production)``."""
    import mlflow

    mlflow.set_tag(
        "mlflow.runName", f"edit {n_facts} facts → {name} v{version}" + (" (production)" if promoted else "")
    )


def _log_inputs(job: EditJob, base: VersionRef, config: MemitConfig, requests: list[EditRequest]) -> None:
    import mlflow

    params = {f"hp.{k}": (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in config.to_dict().items()}
    # Names are namespaced: `mlflow run` logs the raw project parameters under their own names.
    params.update(
        {
            "edit.algorithm": config.algorithm,
            "edit.mode": config.mode,
            "base.model": base.uri,
            "base.fingerprint": base.fingerprint,
            "stats.corpus": job.corpus,
            "stats.tokens": resolve.stats_tokens(base, job.stats_tokens),
            "requests.file": Path(job.requests).name,
            "requests.digest": requests_digest(requests),
            "requests.count": len(requests),
            "registry.storage": job.storage,
            "gate.promote": job.promote,
            "edit.device": str(base.handle.device),
            "gate.min_efficacy": job.thresholds.min_efficacy,
            "gate.max_specificity_drop": job.thresholds.max_specificity_drop,
            "gate.max_ppl_increase": job.thresholds.max_ppl_increase,
        }
    )
    mlflow.log_params({k: v for k, v in params.items() if v is not None and v != ""})  # unset: not logged
    mlflow.log_artifact(job.requests, "inputs")
    _log_dataset(job.requests, requests)


def _log_dataset(path: str, requests: list[EditRequest]) -> None:
    """The request file as an MLflow Dataset (the UI's Datasets column), with its content digest."""
    import mlflow
    import pandas as pd

    frame = pd.DataFrame(
        [
            {"subject": r.subject, "prompt": r.prompt, "target_new": r.target_new, "target_true": r.target_true or ""}
            for r in requests
        ]
    )
    dataset = mlflow.data.from_pandas(
        frame, source=str(Path(path).resolve()), name=Path(path).name, digest=requests_digest(requests)[:32]
    )
    # MLflow's SQL store looks the dataset up, then inserts it: concurrent edits of one request file
    # race on its key, and the loser's retry finds the winner's row.
    retry(lambda: mlflow.log_input(dataset, context="edit"))


def _covariances(
    reg: Registry, job: EditJob, base: VersionRef, config: MemitConfig, run_id: str
) -> dict[int, torch.Tensor]:
    """Per-layer covariances from the cache or one pass; log npz+manifest when computed here, else the
    manifest and the run that produced it."""
    import mlflow

    from editflow.stats import CorpusSpec, layer_covariances

    spec = CorpusSpec(source=job.corpus)
    # C is a property of the unedited model (as in the MEMIT/AlphaEdit papers): an edited version's
    # rewrite weights are swapped back to the root base's for the pass, so the whole lineage shares
    # one cache entry per layer.
    original = (
        flavor.read_tensors(base.base_artifact_uri, base.edited_tensors, reg)
        if base.edited_tensors and base.base_artifact_uri
        else {}
    )
    backup = memit.set_weights(base.handle.model, original)
    try:
        res = layer_covariances(
            base.handle,
            list(config.layers),
            spec,
            resolve.stats_tokens(base, job.stats_tokens),
            dtype=config.mom2_dtype,
            seed=config.seed,
            cache_dir=job.stats_cache,
        )
    finally:
        memit.restore(base.handle.model, backup)
    with tempfile.TemporaryDirectory() as tmp:
        for entry in res.entries:
            key = entry.manifest.get("key_digest") or Path(entry.path).stem
            tag = stats_tag(key)
            manifest = dict(entry.manifest)
            if entry.hit:
                producer = mlflow.search_runs(
                    search_all_experiments=True,
                    filter_string=f"tags.`{tag}` = 'computed'",
                    max_results=1,
                    output_format="list",
                )
                manifest["produced_by_run"] = producer[0].info.run_id if producer else None
            else:
                mlflow.set_tag(tag, "computed")
                mlflow.log_artifact(str(entry.path), "stats")
                manifest["produced_by_run"] = run_id
            path = Path(tmp) / f"{Path(entry.path).stem}.manifest.json"
            path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            mlflow.log_artifact(str(path), "stats")
    return {layer: c for layer, c in res.covs.items()}


def _log_artifacts(
    job: EditJob, requests: list[EditRequest], evaluator: Any, pre: Any, post: Any, result: memit.EditResult
) -> None:
    import mlflow

    from editflow.evaluate import fact_table, write_report

    table = fact_table(requests, pre, post)
    mlflow.log_table(
        table.reset_index(drop=True).astype({c: str for c in table.columns if table[c].dtype == object}),
        "eval/facts.json",
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_report(out, table, {**pre.summary, **post.summary}, evaluator.history, facts_json=False)
        (out / "layer_update_norms.json").write_text(json.dumps(result.layer_update_norms, indent=2))
        (out / "diagnostics.json").write_text(json.dumps([d.__dict__ for d in result.diagnostics], indent=2))
        (out / "context_templates.json").write_text(json.dumps(result.context_templates, indent=2))
        mlflow.log_artifacts(str(out), "eval")
    for name, norm in result.layer_update_norms.items():
        mlflow.log_metric(f"update_norm/{name}", norm)
    for name, ratio in result.layer_update_ratios.items():
        mlflow.log_metric(f"update_ratio/{name}", ratio)
    for name, ratio in result.layer_output_ratios.items():
        mlflow.log_metric(f"output_ratio/{name}", ratio)


def _state_note(entry: dict | None) -> str:
    """``; edit state 1.2 MB (40 keys, float32)``: what the version carries for the next edit."""
    if not entry:
        return ""
    return f"; edit state {entry['bytes'] / 1e6:.1f} MB ({entry['n_keys']} keys, {entry['dtype']})"


def _register(
    reg: Registry,
    job: EditJob,
    name: str,
    base: VersionRef,
    handle: Any,
    requests: list[EditRequest],
    config: MemitConfig,
    metrics: dict[str, float],
    run_id: str,
    carried: dict[str, Any],
) -> int:
    """Log and register the edited model; ``carried`` (edit state, root references) goes into its
    ``editflow.json`` with the rest of the lineage."""
    from editflow.models import fingerprint

    digest = requests_digest(requests)
    edited = sorted(set(base.edited_tensors) | {handle.adapter.rewrite_weight(layer) for layer in config.layers})
    lineage = {
        BASE_VERSION_KEY: base.base_version,
        PARENT_VERSION_KEY: base.version,
        BASE_ARTIFACT_URI_KEY: base.base_artifact_uri,
        BASE_MODEL_URI_KEY: f"models:/{name}/{base.base_version}",
        REQUESTS_DIGEST_KEY: digest,
        N_FACTS_KEY: len(requests),
        RUN_ID_KEY: run_id,
        HPARAMS_KEY: config.to_dict(),
        MODEL_DEFAULTS_KEY: base.handle.extra.get(MODEL_DEFAULTS_KEY, {}),
        FINGERPRINT_KEY: fingerprint(handle.model),
        **carried,
    }
    headline = {k: f"{metrics[f'post/{k}']:.2f}" for k in HEADLINE if f"post/{k}" in metrics}
    tags = {
        ROLE_TAG: ROLE_EDIT,
        PARENT_VERSION_TAG: str(base.version),
        BASE_VERSION_TAG: str(base.base_version),
        N_FACTS_TAG: str(len(requests)),
        **{metric_tag(k): v for k, v in headline.items() if k in HEADLINE_TAGS},
    }
    description = job.description or (
        f"{len(requests)} facts edited into v{base.version} with {config.algorithm} ({config.mode}); "
        + ", ".join(f"{k} {v}" for k, v in headline.items())
        + _state_note(carried.get(EDIT_STATE_KEY))
    )

    def on_registered(version: int) -> None:
        set_alias(reg, name, CANDIDATE, version)
        ledger.record_facts(reg, name, version, requests, digest, run_id)
        ledger.record_event(
            reg,
            name,
            "register",
            version,
            parent_version=base.version,
            run_id=run_id,
            reason=f"{len(requests)} facts, {config.algorithm}/{config.mode}",
        )

    return log_and_register(
        reg,
        name,
        handle,
        storage=job.storage,
        edited_tensors=edited if job.storage == "delta" else (),
        lineage=lineage,
        tags=tags,
        description=description,
        on_registered=on_registered,
    )
