"""Promotion, rollback and the evaluation gate.

Promotion moves the ``production`` alias and keeps MLflow's deprecated stages in step
(Production/Archived). Each move is recorded in the ledger; if any step fails, production is put
back where it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from editflow.registry import ledger
from editflow.registry.store import client, quiet_deprecations
from editflow.registry.versions import PRODUCTION, aliases_of, resolve_version, retry


SPECIFICITY = ("neighborhood", "neighborhood_auto", "heldout", "zsre_specificity")


@dataclass(frozen=True)
class GateThresholds:
    """Defaults: efficacy ≥ 90 %; every specificity figure (CounterFact neighbourhood, automatic
    neighbours of plain requests, held-out known facts) at most 10 points below pre-edit; held-out
    perplexity at most 10 % above pre-edit.

    Cumulative rules, against the lineage's root base: retention of the earlier facts ≥ 90 %;
    held-out perplexity at most 10 % above the root's; held-out known facts at most 10 points below
    the root's. A lineage that drifts a little per version is stopped when the total crosses a line.
    """

    min_efficacy: float = 90.0
    max_specificity_drop: float = 10.0
    max_ppl_increase: float = 0.10
    min_retention: float = 90.0
    max_ppl_increase_root: float = 0.10
    max_specificity_drop_root: float = 10.0


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str]


def gate(metrics: dict[str, float], thresholds: GateThresholds = GateThresholds(),
         root: dict[str, float] | None = None) -> GateResult:
    """Check post-edit metrics against the thresholds, against the parent (``pre/``) and against the
    root base (``root``: its ``drift_ppl`` and ``heldout``); a metric that is absent is not checked."""
    failures = _parent_failures(metrics, thresholds) + _cumulative_failures(metrics, thresholds, root or {})
    return GateResult(passed=not failures, reasons=failures)


def _cumulative_failures(metrics: dict[str, float], t: GateThresholds, root: dict[str, float]) -> list[str]:
    failures = []
    retention = metrics.get("post/retention")
    if retention is not None and retention < t.min_retention:
        failures.append(f"retention of earlier facts {retention:.1f} < {t.min_retention:.1f}")
    ppl, root_ppl = metrics.get("post/drift_ppl"), root.get("drift_ppl")
    if ppl is not None and root_ppl:
        rel = ppl / root_ppl - 1
        if rel > t.max_ppl_increase_root:
            failures.append(f"held-out perplexity {100 * rel:.1f} % above the root base's "
                            f"(> {100 * t.max_ppl_increase_root:.1f} %)")
    heldout, root_heldout = metrics.get("post/heldout"), root.get("heldout")
    if heldout is not None and root_heldout is not None and root_heldout - heldout > t.max_specificity_drop_root:
        failures.append(f"heldout {root_heldout - heldout:.1f} points below the root base's "
                        f"(> {t.max_specificity_drop_root:.1f})")
    return failures


def _parent_failures(metrics: dict[str, float], thresholds: GateThresholds) -> list[str]:
    failures = []
    eff = metrics.get("post/efficacy")
    if eff is not None and eff < thresholds.min_efficacy:
        failures.append(f"efficacy {eff:.1f} < {thresholds.min_efficacy:.1f}")
    for name in SPECIFICITY:
        pre, post = metrics.get(f"pre/{name}"), metrics.get(f"post/{name}")
        if pre is not None and post is not None and pre - post > thresholds.max_specificity_drop:
            failures.append(f"{name} fell {pre - post:.1f} points (> {thresholds.max_specificity_drop:.1f})")
    ppl = metrics.get("post/drift_ppl_rel")
    if ppl is not None and ppl > thresholds.max_ppl_increase:
        failures.append(f"held-out perplexity rose {100 * ppl:.1f} % (> {100 * thresholds.max_ppl_increase:.1f} %)")
    return failures


def production_version(name: str) -> int | None:
    return aliases_of(name).get(PRODUCTION)


def _stage(name: str, version: int) -> str:
    return client().get_model_version(name, str(version)).current_stage


def _set_production(name: str, version: int, previous: int | None) -> None:
    c = client()
    retry(lambda: c.set_registered_model_alias(name, PRODUCTION, str(version)))
    with quiet_deprecations():
        retry(lambda: c.transition_model_version_stage(name, str(version), "Production",
                                                       archive_existing_versions=True))


def _restore_production(name: str, version: int, previous: int | None, old_stage: str) -> None:
    c = client()
    with quiet_deprecations():
        if previous is None:
            c.delete_registered_model_alias(name, PRODUCTION)
        else:
            c.set_registered_model_alias(name, PRODUCTION, str(previous))
            c.transition_model_version_stage(name, str(previous), "Production", archive_existing_versions=False)
        if previous != version:
            c.transition_model_version_stage(name, str(version), old_stage or "None",
                                             archive_existing_versions=False)


def move_production(name: str, ref: str | int, action: str = "promote", reason: str = "",
                    run_id: str | None = None) -> dict[str, Any]:
    """Make version ``ref`` production; on any failure production stays where it was."""
    version = resolve_version(name, ref)
    previous = production_version(name)
    old_stage = _stage(name, version)
    try:
        _set_production(name, version, previous)
        ledger.record_event(name, action, version, previous_version=previous, reason=reason, run_id=run_id)
    except BaseException:
        _restore_production(name, version, previous, old_stage)
        raise
    return {"name": name, "version": version, "previous": previous, "action": action}


def promote(name: str, ref: str | int, reason: str = "", run_id: str | None = None) -> dict[str, Any]:
    return move_production(name, ref, "promote", reason, run_id)


def rollback(name: str, to: str | int | None = None, reason: str = "") -> dict[str, Any]:
    """Return production to ``to``, or to the version that was production before the current one."""
    if to is None:
        current = production_version(name)
        to = ledger.previous_production(name, current)
        if to is None:
            raise LookupError(f"no earlier production version of {name!r} in the ledger; pass --to VERSION")
    return move_production(name, to, "rollback", reason or "rollback")
