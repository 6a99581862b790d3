"""Promotion, rollback and the evaluation gate.

Promotion moves the ``production`` alias and keeps MLflow's deprecated stages in step
(Production/Archived). A move is a small transaction: the target's weights are verified, an intent
(registered-model tag ``editflow.promotion_intent``) is written, the alias and stages move, the
ledger event is recorded and the intent cleared. If a step fails, production is put back where it
was; if the process dies, :func:`resolve_intent` (run by the next promotion and by
:func:`editflow.registry.integrity.repair`) finishes or reverts the move.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from editflow.registry import integrity, ledger
from editflow.registry.schema import INTENT_TAG, PRODUCTION
from editflow.registry.store import Registry, quiet_deprecations
from editflow.registry.versions import aliases_of, resolve_version, retry

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
    warn_output_ratio: float = 1.0

    @classmethod
    def measuring(cls) -> "GateThresholds":
        """A gate that refuses nothing measured (benchmarks; a non-finite update still fails)."""
        return cls(
            min_efficacy=0.0,
            max_specificity_drop=100.0,
            max_ppl_increase=math.inf,
            min_retention=0.0,
            max_ppl_increase_root=math.inf,
            max_specificity_drop_root=100.0,
            warn_output_ratio=math.inf,
        )


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)


def gate(
    metrics: dict[str, float], thresholds: GateThresholds = GateThresholds(), root: dict[str, float] | None = None
) -> GateResult:
    """Check post-edit metrics against the thresholds, against the parent (``pre/``) and against the
    root base (``root``: its ``drift_ppl`` and ``heldout``); a metric that is absent is not checked."""
    failures = _parent_failures(metrics, thresholds) + _cumulative_failures(metrics, thresholds, root or {})
    warnings = []
    ratio, output = metrics.get("post/max_update_ratio"), metrics.get("post/max_output_ratio")
    if any(r is not None and not math.isfinite(r) for r in (ratio, output)):
        failures.append("the weight update is not finite")
    elif output is not None and output > thresholds.warn_output_ratio:
        warnings.append(
            f"a layer's update changes its output on corpus-like keys by {output:.2g}× the output "
            f"itself (> {thresholds.warn_output_ratio:g}): check the statistics before promoting"
        )
    return GateResult(passed=not failures, reasons=failures, warnings=warnings)


#: Slack for comparing percentage-point figures with a limit: scores are means × 100, so a drop of
#: exactly 10 points can arrive as 10.000000000000014 and must not fail a "more than 10" rule.
POINTS_SLACK = 1e-6


def _beyond(value: float, limit: float) -> bool:
    """``value`` exceeds ``limit`` by more than floating-point noise."""
    return value > limit + POINTS_SLACK


def _cumulative_failures(metrics: dict[str, float], t: GateThresholds, root: dict[str, float]) -> list[str]:
    failures = []
    retention = metrics.get("post/retention")
    if retention is not None and _beyond(t.min_retention, retention):
        failures.append(f"retention of earlier facts {retention:.1f} < {t.min_retention:.1f}")
    ppl, root_ppl = metrics.get("post/drift_ppl"), root.get("drift_ppl")
    if ppl is not None and root_ppl:
        rel = ppl / root_ppl - 1
        if rel > t.max_ppl_increase_root:
            failures.append(
                f"held-out perplexity {100 * rel:.1f} % above the root base's (> {100 * t.max_ppl_increase_root:.1f} %)"
            )
    heldout, root_heldout = metrics.get("post/heldout"), root.get("heldout")
    if (
        heldout is not None
        and root_heldout is not None
        and _beyond(root_heldout - heldout, t.max_specificity_drop_root)
    ):
        failures.append(
            f"heldout {root_heldout - heldout:.1f} points below the root base's (> {t.max_specificity_drop_root:.1f})"
        )
    return failures


def _parent_failures(metrics: dict[str, float], thresholds: GateThresholds) -> list[str]:
    failures = []
    eff = metrics.get("post/efficacy")
    if eff is not None and _beyond(thresholds.min_efficacy, eff):
        failures.append(f"efficacy {eff:.1f} < {thresholds.min_efficacy:.1f}")
    for name in SPECIFICITY:
        pre, post = metrics.get(f"pre/{name}"), metrics.get(f"post/{name}")
        if pre is not None and post is not None and _beyond(pre - post, thresholds.max_specificity_drop):
            failures.append(f"{name} fell {pre - post:.1f} points (> {thresholds.max_specificity_drop:.1f})")
    ppl = metrics.get("post/drift_ppl_rel")
    if ppl is not None and ppl > thresholds.max_ppl_increase:
        failures.append(f"held-out perplexity rose {100 * ppl:.1f} % (> {100 * thresholds.max_ppl_increase:.1f} %)")
    return failures


def production_version(reg: Registry, name: str) -> int | None:
    return aliases_of(reg, name).get(PRODUCTION)


def _stage(reg: Registry, name: str, version: int) -> str:
    return reg.client.get_model_version(name, str(version)).current_stage


def _lock(reg: Registry, name: str) -> Any:
    """The store-wide lock serialising production moves of ``name`` (every client, every host)."""
    from editflow.registry import mutex

    return mutex.held(reg, f"production:{name}")


def _set_alias(reg: Registry, name: str, version: int) -> None:
    c = reg.client
    retry(lambda: c.set_registered_model_alias(name, PRODUCTION, str(version)))


def _set_stage(reg: Registry, name: str, version: int) -> None:
    c = reg.client
    with quiet_deprecations():
        # An int: MLflow's SQL store compares it with the integer version column when archiving the
        # others, which PostgreSQL refuses for a string (its REST client converts it itself).
        retry(
            lambda: c.transition_model_version_stage(name, int(version), "Production", archive_existing_versions=True)
        )


def _restore_production(reg: Registry, name: str, version: int, previous: int | None, old_stage: str) -> None:
    c = reg.client
    with quiet_deprecations():
        if previous is None:
            if production_version(reg, name) is not None:
                c.delete_registered_model_alias(name, PRODUCTION)
        else:
            c.set_registered_model_alias(name, PRODUCTION, str(previous))
            c.transition_model_version_stage(name, str(previous), "Production", archive_existing_versions=False)
        if previous != version:
            c.transition_model_version_stage(name, str(version), old_stage or "None", archive_existing_versions=False)


# --------------------------------------------------------------------------- intents


def read_intent(reg: Registry, name: str) -> dict[str, Any] | None:
    """The pending production move of ``name``, if any."""
    text = (reg.client.get_registered_model(name).tags or {}).get(INTENT_TAG)
    return json.loads(text) if text else None


def _write_intent(reg: Registry, name: str, intent: dict[str, Any]) -> None:
    c = reg.client
    retry(lambda: c.set_registered_model_tag(name, INTENT_TAG, json.dumps(intent, sort_keys=True)))


def _clear_intent(reg: Registry, name: str, token: str | None = None) -> None:
    """Remove the intent (only if it is still ``token``'s, when given)."""
    current = read_intent(reg, name)
    if current is None or (token is not None and current.get("token") != token):
        return
    c = reg.client
    retry(lambda: c.delete_registered_model_tag(name, INTENT_TAG))


def _intent_live(intent: dict[str, Any], grace_s: float, mine_dead: bool = False) -> bool:
    """Whether the process that wrote ``intent`` may still be completing it (``mine_dead``: this
    process holds the promotion lock, so an intent of its own is not in progress)."""
    if mine_dead and intent.get("owner") == integrity.owner():
        return False
    alive = integrity.owner_alive(intent.get("owner"))
    return bool(alive) or (alive is None and time.time() - float(intent.get("time", 0)) < grace_s)


def resolve_intent(reg: Registry, name: str, grace_s: float = integrity.GRACE_S, mine_dead: bool = False) -> str | None:
    """Finish (alias already moved: stage and ledger event) or revert (alias not moved: stages back)
    a production move whose process died; ``None`` when there is none, or it is still live."""
    intent = read_intent(reg, name)
    if intent is None or _intent_live(intent, grace_s, mine_dead):
        return None
    target, previous, action = int(intent["target"]), intent.get("previous"), intent["action"]
    current = production_version(reg, name)
    if current == target:
        _set_stage(reg, name, target)
        if not ledger.has_event(reg, name, action, target, previous, int(intent.get("after_event", 0))):
            ledger.record_event(
                reg,
                name,
                action,
                target,
                previous_version=previous,
                run_id=intent.get("run_id"),
                reason=f"{intent.get('reason', '')} (completed by repair after an interrupted move)",
            )
        outcome = f"finished {action} of version {target} (from {previous})"
    else:
        if current == previous:
            _restore_production(reg, name, target, previous, intent.get("old_stage") or "None")
        outcome = f"reverted {action} of version {target}: production stays {current}"
    _clear_intent(reg, name)
    return outcome


def restore_history_top(reg: Registry, name: str, exclude: int) -> int | None:
    """Point production at the top of the ledger's production history that still exists (not
    ``exclude``), or remove the alias when there is none. Used when production's version is deleted."""
    from editflow.registry.versions import versions_of

    usable = {int(v.version) for v in versions_of(reg, name)} - {exclude}
    target = next((v for v in reversed(ledger.production_history(reg, name)) if v in usable), None)
    if target is None:
        with quiet_deprecations():
            reg.client.delete_registered_model_alias(name, PRODUCTION)
        return None
    _set_alias(reg, name, target)
    _set_stage(reg, name, target)
    return target


# --------------------------------------------------------------------------- moves


#: The ledger reason of a production move editflow did not make (the MLflow UI, another tool).
EXTERNAL_MOVE = "the production alias was moved outside editflow"


def reconcile(reg: Registry, name: str) -> str | None:
    """Adopt a production alias moved outside editflow (the MLflow UI, another client): the alias is
    the truth for what serves, so when it names another version than the top of the ledger's
    production history (and no editflow move is in progress), record that move as a ``promote``
    event and bring the version's stage in step; a later plain rollback returns to the version that
    served before it. A removed alias is left as it is. Returns what was done, or ``None``."""
    if read_intent(reg, name) is not None:
        return None
    current = production_version(reg, name)
    history = ledger.production_history(reg, name)
    top = history[-1] if history else None
    if current is None or current == top:
        return None
    _set_stage(reg, name, current)
    ledger.record_event(reg, name, "promote", current, previous_version=top, reason=EXTERNAL_MOVE)
    return f"recorded the production alias moved outside editflow: version {top} → {current}"


def _settle(reg: Registry, name: str) -> None:
    """Resolve a production move a dead process left behind and adopt an alias moved outside editflow
    (call with the lock held); refuse while another process may still be completing a move."""
    pending = read_intent(reg, name)
    if pending is not None and resolve_intent(reg, name, mine_dead=True) is None:
        raise RuntimeError(
            f"another production move of {name!r} is in progress "
            f"(version {pending.get('target')}, by {pending.get('owner')})"
        )
    reconcile(reg, name)


def move_production(
    reg: Registry, name: str, ref: str | int, action: str = "promote", reason: str = "", run_id: str | None = None
) -> dict[str, Any]:
    """Make version ``ref`` production after verifying its weights; on any failure production stays
    where it was. Moving production to the version that already is production changes nothing (no
    ledger entry; ``previous`` equals ``version`` in the result)."""
    with _lock(reg, name):
        _settle(reg, name)
        return _move_locked(reg, name, ref, action, reason, run_id)


def _move_locked(
    reg: Registry, name: str, ref: str | int, action: str, reason: str, run_id: str | None
) -> dict[str, Any]:
    version = resolve_version(reg, name, ref)
    previous = production_version(reg, name)
    if version == previous:
        return {"name": name, "version": version, "previous": previous, "action": action}
    integrity.verify_version(reg, name, version)
    return _move(reg, name, version, previous, action, reason, run_id)


def _move(
    reg: Registry, name: str, version: int, previous: int | None, action: str, reason: str, run_id: str | None
) -> dict[str, Any]:
    """Intent, alias, stage, ledger event, intent cleared (see the module docstring)."""
    old_stage = _stage(reg, name, version)
    token = integrity.owner() + f":{time.time_ns()}"
    _write_intent(
        reg,
        name,
        {
            "token": token,
            "owner": integrity.owner(),
            "time": time.time(),
            "action": action,
            "target": version,
            "previous": previous,
            "old_stage": old_stage,
            "reason": reason,
            "run_id": run_id,
            "after_event": ledger.last_event_id(reg, name),
        },
    )
    try:
        _set_alias(reg, name, version)
        integrity.crashpoint("after_alias_move")
        _set_stage(reg, name, version)
        integrity.crashpoint("before_promote_event")
        ledger.record_event(reg, name, action, version, previous_version=previous, reason=reason, run_id=run_id)
    except BaseException:
        _restore_production(reg, name, version, previous, old_stage)
        _clear_intent(reg, name, token)
        raise
    _clear_intent(reg, name, token)
    return {"name": name, "version": version, "previous": previous, "action": action}


def promote(reg: Registry, name: str, ref: str | int, reason: str = "", run_id: str | None = None) -> dict[str, Any]:
    return move_production(reg, name, ref, "promote", reason, run_id)


def rollback(reg: Registry, name: str, to: str | int | None = None, reason: str = "") -> dict[str, Any]:
    """Return production to ``to``, or to the version that was production before the current one."""
    with _lock(reg, name):
        _settle(reg, name)
        if to is None:
            current = production_version(reg, name)
            to = ledger.previous_production(reg, name, current)
            if to is None:
                raise LookupError(f"no earlier production version of {name!r} in the ledger; pass --to VERSION")
        return _move_locked(reg, name, to, "rollback", reason or "rollback", None)
