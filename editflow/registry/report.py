"""Read-only views of a registered model: the version table, one version, two versions compared."""

from __future__ import annotations

import datetime as dt
from typing import Any

from editflow.registry import ledger
from editflow.registry.schema import (
    BASE_VERSION_TAG,
    METRIC_TAG_PREFIX,
    N_FACTS_TAG,
    PARENT_VERSION_TAG,
    ROLE_TAG,
    is_edit,
)
from editflow.registry.store import Registry
from editflow.registry.versions import aliases_of, resolve_version, versions_of


def _created(ms: int | None) -> str:
    return dt.datetime.fromtimestamp((ms or 0) / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _metrics(tags: dict[str, str]) -> dict[str, str]:
    prefix = METRIC_TAG_PREFIX
    return {k[len(prefix) :]: v for k, v in tags.items() if k.startswith(prefix)}


def version_rows(reg: Registry, name: str) -> list[dict[str, Any]]:
    """One row per version: aliases, stage, parent, facts held, headline metrics, created."""
    by_version: dict[int, list[str]] = {}
    for alias, v in aliases_of(reg, name).items():
        by_version.setdefault(v, []).append(alias)
    rows = []
    for mv in versions_of(reg, name):
        v = int(mv.version)
        tags = dict(mv.tags)
        rows.append(
            {
                "version": v,
                "aliases": ",".join(sorted(by_version.get(v, []))),
                "stage": mv.current_stage,
                "role": tags.get(ROLE_TAG, ""),
                "parent": tags.get(PARENT_VERSION_TAG, ""),
                "facts": len(ledger.held_facts(reg, name, v)),
                "new_facts": tags.get(N_FACTS_TAG, ""),
                **_metrics(tags),
                "created": _created(mv.creation_timestamp),
            }
        )
    return rows


def show_version(reg: Registry, name: str, ref: str | int) -> dict[str, Any]:
    """Everything editflow knows about one version: tags, description, run metrics, facts, events, and
    the edit defaults ``editflow tune`` stored on its root base (``tuned``, None when never tuned)."""
    from editflow.registry.tuned import read_tuned

    v = resolve_version(reg, name, ref)
    c = reg.client
    mv = c.get_model_version(name, str(v))
    run_id = mv.run_id
    # a base is logged inside the run of the first edit that used it: that run's figures are not its own
    run_metrics = dict(c.get_run(run_id).data.metrics) if run_id and is_edit(mv.tags) else {}
    root = int(mv.tags.get(BASE_VERSION_TAG) or v)
    return {
        "name": name,
        "version": v,
        "tuned": read_tuned(reg, name, root),
        "description": mv.description,
        "stage": mv.current_stage,
        "aliases": [a for a, x in aliases_of(reg, name).items() if x == v],
        "tags": dict(mv.tags),
        "run_id": run_id,
        "metrics": run_metrics,
        "facts": [f.__dict__ for f in ledger.own_facts(reg, name, v)],
        "events": [
            {
                "action": e.action,
                "time": e.time.isoformat() if e.time else "",
                "actor": e.actor,
                "previous": e.previous_version,
                "reason": e.reason,
            }
            for e in ledger.events(reg, name)
            if e.version == v
        ],
    }


def _post_metrics(info: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """A version's own metrics (``post/*`` of the run that made it); a base version has none, so when
    it is the other version's parent its figures are that run's ``pre/*`` measurements."""
    own = {k[5:]: v for k, v in info["metrics"].items() if k.startswith("post/")}
    if own or other["tags"].get(PARENT_VERSION_TAG) != str(info["version"]):
        return own
    return {k[4:]: v for k, v in other["metrics"].items() if k.startswith("pre/")}


def compare_versions(reg: Registry, name: str, a: str | int, b: str | int) -> dict[str, Any]:
    """Metric deltas (b − a, from each version's run) and the facts held by one and not the other."""
    va, vb = resolve_version(reg, name, a), resolve_version(reg, name, b)
    sa, sb = show_version(reg, name, va), show_version(reg, name, vb)
    ma, mb = _post_metrics(sa, sb), _post_metrics(sb, sa)
    deltas = {
        k: (ma.get(k), mb.get(k), (mb[k] - ma[k]) if k in ma and k in mb else None) for k in sorted(set(ma) | set(mb))
    }
    fa, fb = ledger.held_facts(reg, name, va), ledger.held_facts(reg, name, vb)
    only_a = [fa[k] for k in fa if k not in fb or fb[k].target_new != fa[k].target_new]
    only_b = [fb[k] for k in fb if k not in fa or fa[k].target_new != fb[k].target_new]
    return {"name": name, "a": va, "b": vb, "metrics": deltas, "only_a": only_a, "only_b": only_b}
