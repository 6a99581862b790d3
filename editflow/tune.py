"""Per-model edit defaults chosen by measurement: ``editflow tune``.

split the records (seeded, disjoint) → causal trace of the model on the tuning split (edit window) →
covariances of every candidate layer, once (cache) → a greedy coordinate search over λ, the target
optimisation and the window, from the defaults and the traced window (each trial: MEMIT edit of the
tuning split, restore, evaluate; the next trial changes one setting of the best so far) → the best
trial edited on the validation split → stored with the registered base (``editflow.tuned`` tag).

The pure parts (split, search space, objective, time-boxed search) come first; :func:`run_tune` does
the MLflow and registry I/O: one parent run, one nested child run per trial. Any failure before the
result is stored registers nothing.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from editflow import memit, progress
from editflow.config import MemitConfig, default_config
from editflow.evaluate.metrics import harmonic_mean
from editflow.registry.store import Registry
from editflow.requests import EditRequest
from editflow.trace import TraceSummary, best_window

#: Hyperparameters a tune chooses (everything else stays at the model's defaults).
TUNED_KEYS = (
    "layers",
    "mom2_update_weight",
    "v_lr",
    "v_num_grad_steps",
    "clamp_norm_factor",
    "v_early_stop_loss",
    "kl_factor",
)
#: Fewest requests in each split.
MIN_PER_SPLIT = 2
#: Objective points lost per 1 % relative increase of held-out perplexity.
DRIFT_WEIGHT = 1.0
#: Objective points lost per 1 % relative loss of fluency (sampled on the split's facts, before vs after).
FLUENCY_WEIGHT = 1.0
#: Validation figures kept in the compact tag.
HEADLINE = (
    "efficacy",
    "paraphrase",
    "neighborhood",
    "neighborhood_auto",
    "zsre_efficacy",
    "zsre_paraphrase",
    "zsre_specificity",
    "heldout",
    "score",
    "drift_ppl_rel",
)


class TuneError(ValueError):
    """A tune cannot run with these inputs (a user error)."""


# --------------------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    """Disjoint tuning and validation requests."""

    tuning: list[EditRequest]
    validation: list[EditRequest]
    tuning_index: list[int]  # positions in the request file
    validation_index: list[int]


def split_requests(requests: Sequence[EditRequest], n_edits: int, seed: int) -> Split:
    """A seeded shuffle cut into two disjoint splits of ``min(n_edits, len // 2)`` requests each."""
    if n_edits < MIN_PER_SPLIT:
        raise TuneError(f"--n-edits must be at least {MIN_PER_SPLIT}, got {n_edits}")
    if len(requests) < 2 * MIN_PER_SPLIT:
        raise TuneError(
            f"too few records to split: need at least {2 * MIN_PER_SPLIT} ({MIN_PER_SPLIT} for tuning, "
            f"{MIN_PER_SPLIT} for validation), got {len(requests)}"
        )
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)
    n = min(n_edits, len(requests) // 2)
    tune, val = order[:n], order[n : 2 * n]
    return Split([requests[i] for i in tune], [requests[i] for i in val], tune, val)


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class SearchSpace:
    """Candidate values: factors multiply the model's default, the others are absolute.

    The window: ``widths`` consecutive MLP layers, placed at the trace's best window of that width
    shifted by one of ``offsets``."""

    lam_factors: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    lr_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    steps_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    clamp_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    early_stop: tuple[float, ...] = (0.01, 0.05)
    kl: tuple[float, ...] = (0.0, 0.0625, 0.25)
    widths: tuple[int, ...] = (1, 2, 3, 4)
    offsets: tuple[int, ...] = (-1, 0, 1)


def candidate_windows(trace: TraceSummary, n_layers: int, space: SearchSpace) -> dict[tuple[int, int], tuple[int, ...]]:
    """(width, offset) → layers: the trace's best window of each width, shifted and kept in range."""
    out = {}
    for width in sorted({min(w, n_layers) for w in space.widths}):
        start = best_window(trace, width)[0]
        for offset in space.offsets:
            s = max(0, min(start + offset, n_layers - width))
            out[(width, offset)] = tuple(range(s, s + width))
    return out


def covariance_layers(windows: Mapping[Any, Sequence[int]], base: MemitConfig) -> list[int]:
    """Every layer some trial may edit (so covariances are computed once, before the search)."""
    return sorted({layer for w in windows.values() for layer in w} | set(base.layers))


def search_axes(
    base: MemitConfig, windows: Mapping[tuple[int, int], tuple[int, ...]], space: SearchSpace
) -> list[tuple[str, list[Any]]]:
    """The coordinates of the search, each with its candidate values, most influential first: λ (the
    edit/preservation trade-off), then the target optimisation (steps, learning rate, early stop), the
    layer window, the clamp and the KL weight."""
    return [
        ("mom2_update_weight", [base.mom2_update_weight * f for f in space.lam_factors]),
        ("v_num_grad_steps", [max(1, round(base.v_num_grad_steps * f)) for f in space.steps_factors]),
        ("v_lr", [base.v_lr * f for f in space.lr_factors]),
        ("v_early_stop_loss", list(space.early_stop)),
        ("layers", [tuple(w) for _, w in sorted(windows.items())]),
        ("clamp_norm_factor", [base.clamp_norm_factor * f for f in space.clamp_factors]),
        ("kl_factor", list(space.kl)),
    ]


def tuned_values(config: MemitConfig) -> dict[str, Any]:
    """The :data:`TUNED_KEYS` of a config (JSON-ready)."""
    d = config.to_dict()
    return {k: d[k] for k in TUNED_KEYS}


def next_trial(
    base: MemitConfig,
    traced_layers: Sequence[int],
    axes: Sequence[tuple[str, Sequence[Any]]],
    trials: Sequence[Trial],
) -> MemitConfig | None:
    """The next configuration of a greedy coordinate search, or None when every neighbour is measured.

    First the defaults, then the defaults on the traced window; after that, from the best trial so
    far, one coordinate changed at a time, in the order of ``axes``. On a numeric coordinate the values
    nearest the best come first, alternating down and up, and a direction is given up at its first
    measured value that scored below the best (so λ × 10 is not tried once λ × 3 lost). The layer
    windows are all tried. An improvement moves the search to the new best. Deterministic: the same
    trials give the same proposal."""
    scores = {_key(t.hparams): t.objective for t in trials}
    for config in (base, base.replace(layers=list(traced_layers))):
        if _key(tuned_values(config)) not in scores:
            return config
    top = max(trials, key=lambda t: t.objective)  # ties: the earlier trial
    best = base.replace(**top.hparams)
    for name, values in axes:
        for config in _neighbours(best, name, values, scores, top.objective):
            if _key(tuned_values(config)) not in scores:
                return config
    return None


def _neighbours(
    best: MemitConfig, name: str, values: Sequence[Any], scores: Mapping[str, float], top: float
) -> Iterator[MemitConfig]:
    """``best`` with coordinate ``name`` set to each candidate value, in search order (see :func:`next_trial`)."""
    if name == "layers":
        yield from (best.replace(layers=list(v)) for v in values)
        return
    current = getattr(best, name)
    sides = [sorted((v for v in values if v < current), reverse=True), sorted(v for v in values if v > current)]
    open_sides = [True, True]
    for step in range(max(map(len, sides))):
        for side, ordered in enumerate(sides):
            if not open_sides[side] or step >= len(ordered):
                continue
            config = best.replace(**{name: ordered[step]})
            measured = scores.get(_key(tuned_values(config)))
            if measured is None:
                yield config
            elif measured < top:
                open_sides[side] = False


def _key(hparams: Mapping[str, Any]) -> str:
    return repr(sorted((k, list(v) if isinstance(v, (list, tuple)) else v) for k, v in hparams.items()))


# --------------------------------------------------------------------------- objective


def objective(
    metrics: Mapping[str, float], drift_weight: float = DRIFT_WEIGHT, fluency_weight: float = FLUENCY_WEIGHT
) -> float:
    """Harmonic mean of efficacy, paraphrase and neighbourhood (zsRE analogues; ``neighborhood_auto``
    when there are no neighbourhood prompts), minus ``drift_weight`` points per 1 % perplexity increase
    and ``fluency_weight`` points per 1 % fluency loss (``fluency_rel``: after / before − 1)."""
    keys = [
        "efficacy",
        "paraphrase",
        "neighborhood" if "neighborhood" in metrics else "neighborhood_auto",
        "zsre_efficacy",
        "zsre_paraphrase",
        "zsre_specificity",
    ]
    parts = [float(metrics[k]) for k in keys if k in metrics and not math.isnan(float(metrics[k]))]
    if not parts:
        raise TuneError("the requests carry nothing to score (no efficacy or zsRE metrics)")
    drift = max(0.0, float(metrics.get("drift_ppl_rel", 0.0) or 0.0))
    fluency_loss = max(0.0, -float(metrics.get("fluency_rel", 0.0) or 0.0))
    return harmonic_mean(parts) - drift_weight * 100.0 * drift - fluency_weight * 100.0 * fluency_loss


# --------------------------------------------------------------------------- time-boxed search


@dataclass
class Trial:
    """One measured configuration."""

    index: int
    hparams: dict[str, Any]
    metrics: dict[str, float]
    objective: float
    seconds: float
    run_id: str | None = None


@dataclass
class SearchOutcome:
    """The trials run, the best one, and whether the time box ended the search early."""

    trials: list[Trial]
    best: Trial
    planned: int
    stopped_by_budget: bool
    budget_s: float

    @property
    def message(self) -> str:
        best = f"trial {self.best.index} (objective {self.best.objective:.2f})"
        if self.stopped_by_budget:
            return (
                f"time box of {self.budget_s / 60:g} min reached after {len(self.trials)} of {self.planned} "
                f"trials: keeping the best trial so far, {best}"
            )
        if len(self.trials) < self.planned:
            return f"{len(self.trials)} trials run (every neighbour of the best measured); best {best}"
        return f"{len(self.trials)} trials run; best {best}"


def search(
    propose: Callable[[Sequence[Trial]], MemitConfig | None],
    run_trial: Callable[[int, MemitConfig], Trial],
    limit: int,
    budget_s: float,
    started: float,
    clock: Callable[[], float] = time.monotonic,
) -> SearchOutcome:
    """Run up to ``limit`` trials, each proposed from the ones before, while ``clock() - started <
    budget_s`` (the first trial always runs); keep the best."""
    if limit < 1:
        raise TuneError("no trials to run (--trials must be >= 1)")
    trials: list[Trial] = []
    stopped = False
    with progress.bar(total=limit, desc="tune", unit="trial") as bar:
        while len(trials) < limit:
            if trials and clock() - started >= budget_s:
                stopped = True
                break
            config = propose(trials)
            if config is None:
                break
            trials.append(run_trial(len(trials), config))
            best = max(trials, key=lambda t: t.objective)
            bar.set_postfix(best=f"{best.objective:.1f}")
            bar.update(1)
    if not trials:
        raise TuneError("the search proposed no configuration")
    best = max(trials, key=lambda t: t.objective)  # ties: the earlier trial
    return SearchOutcome(trials, best, limit, stopped, budget_s)


# --------------------------------------------------------------------------- one edit, measured


def edit_and_evaluate(
    handle: Any, requests: Sequence[EditRequest], covs: Mapping[int, torch.Tensor], config: MemitConfig, evaluator: Any
) -> dict[str, float]:
    """Edit ``requests`` (the model is restored afterwards), evaluate the edited model, restore it again."""
    result = memit.edit(
        handle.model,
        handle.tokenizer,
        handle.adapter,
        requests,
        {layer: covs[layer] for layer in config.layers},
        config,
        keep_applied=False,
    )
    backup = memit.apply_deltas(handle.model, result.deltas)
    try:
        post = evaluator.post()
    finally:
        memit.restore(handle.model, backup)
    return dict(post.metrics)


# --------------------------------------------------------------------------- the tune job (I/O)


@dataclass
class TuneJob:
    """What ``editflow tune`` asks for."""

    model: str
    records: str
    budget_minutes: float = 30.0
    trials: int = 12
    n_edits: int = 10
    seed: int = 0
    registered_model: str | None = None
    corpus: str = "bundled"
    stats_tokens: int | None = None
    stats_cache: str | None = None
    trace_samples: int = 5
    device: str | None = None
    from_published: bool = False  # start from the family's published defaults, not the model's current ones
    space: SearchSpace = field(default_factory=SearchSpace)

    def __post_init__(self) -> None:
        if not self.budget_minutes > 0:
            raise TuneError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.trials < 1:
            raise TuneError(f"--trials must be >= 1, got {self.trials}")
        if self.trace_samples < 1:
            raise TuneError("trace samples must be >= 1")


@dataclass
class TuneOutcome:
    run_id: str
    name: str
    version: int
    hparams: dict[str, Any]
    validation: dict[str, float]
    search: SearchOutcome
    layers_traced: tuple[int, ...]
    report: dict[str, Any]


def _load_base(reg: Registry, job: TuneJob) -> tuple[Any, bool]:
    """The base (not registered yet where possible) and whether it is the bundled default model."""
    from editflow.registry import resolve
    from editflow.registry.store import DEFAULT_MODEL_NAME
    from editflow.registry.versions import versions_of

    is_default = job.model in ("", "default")
    if is_default and not versions_of(reg, DEFAULT_MODEL_NAME):  # register it only once the tune succeeded
        base = resolve.resolve_base(reg, str(resolve.bundled_model_dir()), device=job.device)
    else:
        base = resolve.resolve_base(reg, job.model, device=job.device)
    if base.edited_tensors:  # defaults belong to the root base, which the edits start from
        from editflow.registry.versions import load_version

        progress.note(f"editflow: {base.uri} is an edited version; tuning its base, version {base.base_version}")
        base = load_version(reg, base.name, base.base_version, device=job.device)
    return base, is_default


def _covariances(
    job: TuneJob, handle: Any, layers: Sequence[int], config: MemitConfig, tokens: int
) -> dict[int, torch.Tensor]:
    from editflow.stats import CorpusSpec, layer_covariances

    res = layer_covariances(
        handle,
        layers,
        CorpusSpec(source=job.corpus),
        tokens,
        dtype=config.mom2_dtype,
        seed=config.seed,
        cache_dir=job.stats_cache,
    )
    return dict(res.covs)


def _evaluator(handle: Any, requests: Sequence[EditRequest], heldout_facts: int, seed: int) -> Any:
    from editflow.evaluate import Evaluator, default_heldout_facts, drift_texts

    facts = default_heldout_facts(requests, heldout_facts) if heldout_facts else ()
    ev = Evaluator(handle, requests, heldout_texts=drift_texts(requests), heldout_facts=facts, fluency=True, seed=seed)
    ev.pre()
    return ev


def with_fluency_change(post: Mapping[str, float], pre: Mapping[str, float]) -> dict[str, float]:
    """``post`` with ``fluency_rel`` = post / pre − 1 when both have fluency."""
    out = dict(post)
    if post.get("fluency") and pre.get("fluency"):
        out["fluency_rel"] = float(post["fluency"]) / float(pre["fluency"]) - 1.0
    return out


def _log_trial(index: int, config: MemitConfig, metrics: dict[str, float], score: float, seconds: float) -> str:
    """A nested child run with the trial's hyperparameters and figures; returns its id."""
    import mlflow

    with mlflow.start_run(run_name=f"trial-{index}", nested=True) as run:
        mlflow.log_params(
            {
                "trial": index,
                **{
                    f"hp.{k}": (",".join(map(str, v)) if isinstance(v, list) else v)
                    for k, v in tuned_values(config).items()
                },
            }
        )
        mlflow.log_metrics(
            {
                **{f"post/{k}": float(v) for k, v in metrics.items() if not math.isnan(float(v))},
                "objective": score,
                "time/trial_s": seconds,
            }
        )
        return run.info.run_id


def _trial_runner(
    handle: Any, requests: Sequence[EditRequest], covs: Mapping[int, torch.Tensor], evaluator: Any
) -> Callable[[int, MemitConfig], Trial]:
    def run(index: int, config: MemitConfig) -> Trial:
        t0 = time.perf_counter()
        metrics = with_fluency_change(
            edit_and_evaluate(handle, requests, covs, config, evaluator), evaluator.pre().metrics
        )
        seconds = time.perf_counter() - t0
        score = objective(metrics)
        run_id = _log_trial(index, config, metrics, score, seconds)
        return Trial(index, tuned_values(config), _finite(metrics), score, seconds, run_id)

    return run


def _start_parent(reg: Registry):
    """The tune's parent run (fluent API: ``reg`` pointed it at its store when it was built)."""
    import mlflow

    if mlflow.active_run() is None:
        mlflow.set_experiment(experiment_id=reg.ensure_experiment())
    return mlflow.start_run(run_name="tune", nested=mlflow.active_run() is not None)


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def _target_name(job: TuneJob, base: Any, is_default: bool) -> str:
    """The registered model the result is stored with."""
    from editflow.registry import resolve
    from editflow.registry.store import DEFAULT_MODEL_NAME

    if job.registered_model:
        return job.registered_model
    if base.name:
        return base.name
    return DEFAULT_MODEL_NAME if is_default else resolve.default_registered_name(base)


def _log_inputs(job: TuneJob, name: str, base: Any, requests: Sequence[EditRequest], split: Split, tokens: int) -> None:
    import mlflow

    from editflow.registry.schema import ROLE_TAG, ROLE_TUNE, TUNE_MODEL_TAG
    from editflow.requests import requests_digest

    mlflow.set_tags({ROLE_TAG: ROLE_TUNE, TUNE_MODEL_TAG: name})
    mlflow.log_params(
        {
            "tune.model": job.model or "default",
            "tune.registered_model": name,
            "tune.records": job.records,
            "tune.records_digest": requests_digest(requests),
            "tune.n_records": len(requests),
            "tune.n_tuning": len(split.tuning),
            "tune.n_validation": len(split.validation),
            "tune.trials": job.trials,
            "tune.n_edits": job.n_edits,
            "tune.budget_minutes": job.budget_minutes,
            "tune.seed": job.seed,
            "tune.start": "published" if job.from_published else "model",
            "tune.stats_tokens": tokens,
            "tune.corpus": job.corpus,
            "base.fingerprint": base.fingerprint,
        }
    )


def _trace(job: TuneJob, handle: Any, requests: Sequence[EditRequest]) -> TraceSummary:
    """Causal trace of the tuning split, logged as ``trace.json``."""
    import mlflow

    from editflow.trace import trace_requests

    progress.note("editflow: causal trace of the tuning split …")
    _, trace = trace_requests(
        handle.model,
        handle.tokenizer,
        requests,
        handle.adapter,
        samples=job.trace_samples,
        seed=job.seed,
        hidden_states=False,  # the window needs the MLP effects only
    )
    mlflow.log_dict(trace.to_dict(), "trace.json")
    return trace


def _validate(
    handle: Any, requests: Sequence[EditRequest], covs: Mapping[int, torch.Tensor], config: MemitConfig
) -> tuple[dict[str, float], dict[str, float]]:
    """(pre-edit, post-edit + objective) figures of ``config`` edited on the validation split, logged."""
    import mlflow

    progress.note("editflow: validating the best trial …")
    ev = _evaluator(handle, requests, 50, config.seed)
    post = with_fluency_change(edit_and_evaluate(handle, requests, covs, config, ev), ev.pre().metrics)
    pre, post = _finite(ev.pre().metrics), {**_finite(post), "objective": objective(post)}
    mlflow.log_metrics(
        {**{f"validation_pre/{k}": v for k, v in pre.items()}, **{f"validation/{k}": v for k, v in post.items()}}
    )
    return pre, post


def _log_outcome(outcome: SearchOutcome) -> None:
    import mlflow

    from editflow.registry.schema import TUNE_BEST_TRIAL_TAG, TUNE_MESSAGE_TAG, TUNE_STOPPED_TAG

    progress.note("editflow: " + outcome.message)
    mlflow.log_metrics({"best/objective": outcome.best.objective, "trials_run": len(outcome.trials)})
    mlflow.set_tags(
        {
            TUNE_BEST_TRIAL_TAG: str(outcome.best.index),
            TUNE_STOPPED_TAG: "budget" if outcome.stopped_by_budget else "complete",
            TUNE_MESSAGE_TAG: outcome.message,
        }
    )


def _report(
    job: TuneJob,
    name: str,
    run_id: str,
    requests: Sequence[EditRequest],
    split: Split,
    defaults: MemitConfig,
    trace: TraceSummary,
    traced: tuple[int, ...],
    outcome: SearchOutcome,
    val_pre: dict[str, float],
    validation: dict[str, float],
    tokens: int,
) -> dict[str, Any]:
    """The full tune report (logged as ``tune_report.json``)."""
    from editflow.requests import requests_digest

    return {
        "model": job.model or "default",
        "registered_model": name,
        "run_id": run_id,
        "records": job.records,
        "records_digest": requests_digest(requests),
        "split": {"seed": job.seed, "tuning": split.tuning_index, "validation": split.validation_index},
        "defaults": tuned_values(defaults),
        "start": "published" if job.from_published else "model",
        "trace": {"best_window": list(traced), **trace.to_dict()},
        "trials": [asdict(t) for t in outcome.trials],
        "best_trial": outcome.best.index,
        "stopped_by_budget": outcome.stopped_by_budget,
        "message": outcome.message,
        "hparams": outcome.best.hparams,
        "validation_pre": val_pre,
        "validation": validation,
        "stats_tokens": tokens,
    }


def run_tune(job: TuneJob, reg: Registry | None = None) -> TuneOutcome:
    """Tune the edit defaults of ``job.model`` on ``job.records`` (see the module docstring) in ``reg``'s
    store (default: a :class:`~editflow.registry.store.Registry` of the environment's, built here)."""
    import mlflow

    from editflow.registry import resolve
    from editflow.registry.schema import TUNE_VERSION_TAG
    from editflow.requests import check_tokenizable, load_requests

    started = time.monotonic()
    requests = load_requests(job.records)
    split = split_requests(requests, job.n_edits, job.seed)
    progress.note("editflow: loading the model …")
    reg = reg or Registry()
    base, is_default = _load_base(reg, job)
    handle = base.handle
    check_tokenizable(requests, handle.tokenizer)
    name = _target_name(job, base, is_default)
    if job.from_published:
        defaults = default_config(handle.adapter.model_type, handle.adapter.n_layers)
    else:
        defaults = resolve.config_for(reg, base, {})
    tokens = resolve.stats_tokens(base, job.stats_tokens)

    with _start_parent(reg) as parent:
        _log_inputs(job, name, base, requests, split, tokens)
        trace = _trace(job, handle, split.tuning)
        traced = best_window(trace, len(defaults.layers))
        windows = candidate_windows(trace, handle.adapter.n_layers, job.space)
        axes = search_axes(defaults, windows, job.space)

        progress.note("editflow: layer statistics …")
        covs = _covariances(job, handle, covariance_layers(windows, defaults), defaults, tokens)
        progress.note("editflow: evaluating the unedited model …")
        tuning_ev = _evaluator(handle, split.tuning, 0, defaults.seed)
        mlflow.log_metrics({f"tuning_pre/{k}": v for k, v in _finite(tuning_ev.pre().metrics).items()})

        outcome = search(
            lambda trials: next_trial(defaults, traced, axes, trials),
            _trial_runner(handle, split.tuning, covs, tuning_ev),
            job.trials,
            job.budget_minutes * 60,
            started,
        )
        _log_outcome(outcome)
        val_pre, validation = _validate(handle, split.validation, covs, defaults.replace(**outcome.best.hparams))
        report = _report(
            job,
            name,
            parent.info.run_id,
            requests,
            split,
            defaults,
            trace,
            traced,
            outcome,
            val_pre,
            validation,
            tokens,
        )
        mlflow.log_dict(report, "tune_report.json")
        name, version = register_and_store(reg, base, name, is_default, tuned_result(report))
        mlflow.set_tags({TUNE_VERSION_TAG: str(version)})
        return TuneOutcome(parent.info.run_id, name, version, outcome.best.hparams, validation, outcome, traced, report)


def tuned_result(report: Mapping[str, Any]) -> dict[str, Any]:
    """What goes into the ``editflow.tuned`` tag: chosen hyperparameters, validation figures, provenance."""
    val = report["validation"]
    return {
        "hparams": dict(report["hparams"]),
        "validation": {k: round(float(val[k]), 3) for k in (*HEADLINE, "objective") if k in val},
        "trial": report["best_trial"],
        "trials": len(report["trials"]),
        "stopped_by_budget": bool(report["stopped_by_budget"]),
        "run_id": report["run_id"],
        "records_digest": report["records_digest"],
        "stats_tokens": report["stats_tokens"],
    }


def register_and_store(
    reg: Registry, base: Any, name: str, is_default: bool, result: dict[str, Any]
) -> tuple[str, int]:
    """Register ``base`` under ``name`` unless it is already, then store ``result`` on that version. If
    storing fails, a version registered here is deleted again (with its registered model, if new)."""
    from editflow.registry import resolve, tuned
    from editflow.registry.store import DEFAULT_MODEL_NAME
    from editflow.registry.versions import versions_of

    tuned.check_result(result)
    before = {int(v.version) for v in versions_of(reg, name)}
    if base.version is not None and base.name == name:
        version = int(base.version)
    elif is_default and name == DEFAULT_MODEL_NAME:
        version = resolve.ensure_default_model(reg)
    else:
        version = int(resolve.ensure_registered_base(reg, base, name).version)
    try:
        tuned.store_tuned(reg, name, version, result)
    except BaseException:
        if version not in before:
            tuned.unregister(reg, name, version, drop_model=not before)
        raise
    return name, version
