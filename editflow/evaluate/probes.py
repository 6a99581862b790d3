"""Probes: the prompts each request is checked on, and the targets they are scored against.

Every check is (fact, kind, text, new ids, true ids). The "true" side is ``target_true`` when the
request has one, else the **pre-edit model's greedy answer** to that prompt (as many tokens as the new
target): plain requests thereby get efficacy (new beats what the model said before) and specificity.

Automatic neighbours (plain requests without ``neighborhood_prompts``): the request's prompt filled
with other requests' subjects — same relation, another subject, the CounterFact notion — skipping
pairs that are themselves edited; they must keep their pre-edit answer over the edited target.
Held-out facts (kind ``heldout``, fact −1): CounterFact-style requests not being edited, scored for
``target_true`` (true side) against ``target_new``; the evaluator keeps those the unedited model knows
(:func:`editflow.evaluate.known.known_mask`), which must keep preferring their true target.

Pre-edit answers are computed once (:func:`answer_queries` → greedy → :func:`build_checks`) and the
same checks are scored before and after the edit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from editflow.requests import EditRequest
from editflow.tokens import encode, encode_target

Ids = tuple[int, ...]
HELDOUT_FACT = -1


@dataclass(frozen=True)
class Check:
    """One prompt of one request, with the token ids of both sides (None where absent)."""

    fact: int
    kind: str
    text: str
    new: Ids | None
    true: Ids | None


@dataclass(frozen=True)
class Probe:
    """A prompt before its reference answer is known: ``true`` None means "ask the pre-edit model"."""

    fact: int
    kind: str
    text: str
    new: Ids | None
    true: Ids | None
    answer_len: int = 0


def auto_neighbor_texts(requests: Sequence[EditRequest], i: int, n: int) -> list[str]:
    """Up to ``n`` texts: request i's prompt with other requests' subjects (cyclic from i+1), never an
    edited (subject, prompt) pair or request i's own subject.

    The plain statement of the rule, quadratic over a batch: the reference the tests hold
    :func:`editflow.requests.neighbor_index` (what the evaluator uses) to."""
    edited = {(r.subject, r.prompt) for r in requests}
    me, out, seen = requests[i], [], set()
    for k in range(1, len(requests)):
        subject = requests[(i + k) % len(requests)].subject
        if len(out) >= n:
            break
        if subject == me.subject or subject in seen or (subject, me.prompt) in edited:
            continue
        seen.add(subject)
        out.append(me.prompt.format(subject))
    return out


def _ids(tokenizer: object, text: str | None) -> Ids | None:
    return tuple(encode_target(tokenizer, text)) if text else None


def request_probes(tokenizer: object, requests: Sequence[EditRequest], n_auto_neighbors: int = 5) -> list[Probe]:
    """All probes of the edited requests, by source format (module docstring)."""
    from editflow.requests import neighbor_index

    probes: list[Probe] = []
    needs_auto = any(not r.neighborhood_prompts and r.source_format != "zsre" for r in requests)
    auto = neighbor_index(requests, n_auto_neighbors) if needs_auto else [[] for _ in requests]
    for i, r in enumerate(requests):
        new = _ids(tokenizer, r.target_new)
        if r.source_format == "zsre":
            probes.append(Probe(i, "zsre_rewrite", r.text, new, None))
            probes += [Probe(i, "zsre_paraphrase", p, new, None) for p in r.paraphrase_prompts]
            if r.loc and r.loc_ans:
                probes.append(Probe(i, "zsre_loc", r.loc, None, _ids(tokenizer, r.loc_ans)))
            continue
        true = _ids(tokenizer, r.target_true)
        n = len(new or ())
        probes.append(Probe(i, "rewrite", r.text, new, true, n))
        probes += [Probe(i, "paraphrase", p, new, true, n) for p in r.paraphrase_prompts]
        probes += [Probe(i, "neighborhood", p, new, true, n) for p in r.neighborhood_prompts]
        if not r.neighborhood_prompts:
            probes += [Probe(i, "neighborhood_auto", t, new, None, n) for t in auto[i]]
    return probes


def heldout_probes(tokenizer: object, facts: Sequence[EditRequest]) -> list[Probe]:
    """One probe per held-out fact with both targets: true = ``target_true``, new = ``target_new``."""
    return [
        Probe(HELDOUT_FACT, "heldout", r.text, _ids(tokenizer, r.target_new), _ids(tokenizer, r.target_true))
        for r in facts
        if r.target_true and r.target_new
    ]


def fitting_probes(tokenizer: object, probes: Sequence[Probe], positions: int | None) -> tuple[list[Probe], int]:
    """The probes whose prompt and longest answer fit in ``positions`` tokens, and how many did not.

    Edit requests are length-checked before any work (:func:`editflow.memit.check_lengths`); an
    evaluation-only prompt that cannot fit (a zsRE record's long locality answer on a small model, say)
    is left out and counted instead of failing the run."""
    if positions is None:
        return list(probes), 0
    kept = [
        p
        for p in probes
        if len(encode(tokenizer, p.text)) + max(len(p.new or ()), len(p.true or ()), p.answer_len) <= positions
    ]
    return kept, len(probes) - len(kept)


def answer_queries(probes: Sequence[Probe]) -> list[tuple[str, int]]:
    """(text, n_tokens) of the probes whose reference is the pre-edit answer (true is None)."""
    return [(p.text, p.answer_len) for p in probes if p.true is None and p.answer_len > 0]


def build_checks(probes: Sequence[Probe], answers: Mapping[tuple[str, int], Ids]) -> list[Check]:
    """Fill in the pre-edit answers of the probes that need one."""
    return [
        Check(
            p.fact,
            p.kind,
            p.text,
            p.new,
            p.true if p.true is not None or p.answer_len == 0 else answers[(p.text, p.answer_len)],
        )
        for p in probes
    ]
