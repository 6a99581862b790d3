"""Benchmark record hygiene shared by the lifelong benchmarks."""

from __future__ import annotations


def without_evaluated_anchors(records: list[dict]) -> list[dict]:
    """``records`` with every attribute prompt that is also some record's neighbourhood prompt
    removed, so the repair's anchor term (``repair_anchor``) never trains on a prompt the
    neighbourhood score evaluates. Attribute prompts are used by nothing else."""
    evaluated = {p for r in records for p in r.get("neighborhood_prompts", ())}
    return [
        {**r, "attribute_prompts": [p for p in r["attribute_prompts"] if p not in evaluated]}
        if "attribute_prompts" in r
        else r
        for r in records
    ]
