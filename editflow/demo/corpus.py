"""Deterministic fact corpus for the bundled default model, built from CounterFact-format records.

For each record the corpus states the true facts the record is about (rewrite prompt, paraphrases,
neighbourhood and attribute prompts, further phrasings of the same relation taken from other
records) plus made-up attributes of the subject in several phrasings, mixed with synthetic
encyclopedic filler so the model stays a language model. One phrasing per relation is held out
to measure whether the model learned facts about subjects rather than phrasings.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from editflow.demo.options import CorpusOptions

Record = dict

# Made-up attributes: (value pool, phrasings with the relation stated after the subject).
SYNTHETIC_RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "colour": (
        ("crimson", "amber", "violet", "teal", "ochre", "indigo", "scarlet", "olive", "silver", "ivory"),
        (
            "{}'s emblem colour is",
            "{} has the emblem colour",
            "The emblem colour of {} is",
            "{} is marked by the colour",
        ),
    ),
    "mascot": (
        ("falcon", "otter", "badger", "heron", "lynx", "tortoise", "raven", "stag", "salmon", "beetle"),
        ("{}'s mascot is the", "{} has as its mascot the", "The mascot of {} is the", "{} is represented by the"),
    ),
    "archive": (
        (
            "Alderwick",
            "Brennhall",
            "Corvale",
            "Dunmere",
            "Elsford",
            "Farrowby",
            "Glenhart",
            "Hollins",
            "Ivesham",
            "Kestwick",
        ),
        (
            "{} is catalogued in the archive of",
            "{}'s records are kept in",
            "The archive holding {} is in",
            "{} has its records stored in",
        ),
    ),
}

_FILLER_WORDS = {
    "adj": (
        "old",
        "small",
        "large",
        "quiet",
        "northern",
        "southern",
        "ancient",
        "modern",
        "famous",
        "busy",
        "narrow",
        "wide",
        "green",
        "rocky",
        "coastal",
        "eastern",
        "western",
        "central",
        "historic",
        "remote",
    ),
    "noun": (
        "river",
        "village",
        "bridge",
        "castle",
        "market",
        "harbour",
        "forest",
        "valley",
        "church",
        "library",
        "museum",
        "railway",
        "garden",
        "school",
        "mountain",
        "island",
        "road",
        "tower",
        "mill",
        "lake",
    ),
    "verb": (
        "crosses",
        "overlooks",
        "surrounds",
        "connects",
        "borders",
        "faces",
        "follows",
        "serves",
        "joins",
        "shelters",
    ),
    "agent": (
        "The council",
        "A local guild",
        "The town",
        "A merchant family",
        "The university",
        "A monastery",
        "The railway company",
        "A group of farmers",
        "The regional government",
        "A wealthy patron",
    ),
    "act": (
        "built",
        "restored",
        "expanded",
        "rebuilt",
        "founded",
        "repaired",
        "designed",
        "extended",
        "renamed",
        "opened",
    ),
    "period": (
        "the twelfth century",
        "the fifteenth century",
        "the early modern period",
        "the nineteenth century",
        "the late medieval period",
        "the industrial era",
        "the twentieth century",
        "the interwar years",
    ),
    "feature": (
        "a stone arch",
        "a wooden roof",
        "a clock tower",
        "a walled courtyard",
        "a long terrace",
        "a small chapel",
        "a public square",
        "a painted ceiling",
        "a narrow canal",
        "a broad avenue",
    ),
}

_FILLER_TEMPLATES = (
    "The {adj} {noun} {verb} the {adj2} {noun2}.",
    "{agent} {act} the {noun} in {period}.",
    "The {noun} is known for {feature} and a {adj} {noun2}.",
    "In {period}, {agent_l} {act} a {adj} {noun} near the {noun2}.",
    "Visitors to the {adj} {noun} often walk to the {noun2}, which {verb} the {adj2} {noun3}.",
    "The {noun} has {feature}, {act} by {agent_l} in {period}.",
    "A {adj} {noun} {verb} the {noun2}, and {feature} stands beside it.",
)


@dataclass(frozen=True)
class Corpus:
    """Training documents, covariance-statistics documents, held-out text and evaluation prompts."""

    train: list[str]
    stats: list[str]
    heldout: list[str]
    heldout_phrasings: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, true, new)
    subject_of: dict[str, str] = field(default_factory=dict)  # training document -> the subject it states a fact of


def load_records(paths: list[str | Path]) -> list[Record]:
    """Load CounterFact records from JSON files, deduplicated by ``case_id`` (first occurrence wins)."""
    seen: dict[int, Record] = {}
    for path in paths:
        for rec in json.loads(Path(path).read_text()):
            seen.setdefault(rec["case_id"], rec)
    return list(seen.values())


def _fact(prompt: str, target: str) -> str:
    return f"{prompt} {target}."


def relation_templates(records: list[Record]) -> dict[str, list[str]]:
    """All distinct rewrite-prompt templates per relation id, sorted for determinism."""
    out: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        rw = rec["requested_rewrite"]
        out[rw["relation_id"]].add(rw["prompt"])
    return {k: sorted(v) for k, v in out.items()}


def split_templates(templates: dict[str, list[str]], seed: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Hold out one template per relation that has at least three; return (train, held-out)."""
    rng = random.Random(seed)
    train, held = {}, {}
    for rel, temps in sorted(templates.items()):
        if len(temps) >= 3:
            h = rng.choice(temps)
            held[rel] = h
            train[rel] = [t for t in temps if t != h]
        else:
            train[rel] = list(temps)
    return train, held


def subject_facts(rec: Record, templates: list[str], n_extra: int, rng: random.Random) -> list[str]:
    """True-fact sentences about the record's subject: rewrite, paraphrases, extra phrasings."""
    rw = rec["requested_rewrite"]
    subj, true = rw["subject"], rw["target_true"]["str"]
    facts = [_fact(rw["prompt"].format(subj), true)]
    facts += [_fact(p, true) for p in rec["paraphrase_prompts"]]
    extra = [t for t in templates if t != rw["prompt"]]
    facts += [_fact(t.format(subj), true) for t in rng.sample(extra, min(n_extra, len(extra)))]
    return facts


def template_subject(prompt: str, templates: list[str]) -> tuple[str, str] | None:
    """(template, subject) when ``prompt`` is one of ``templates`` filled with a subject, else None."""
    for t in templates:
        head, tail = t.split("{}", 1)
        if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head) + len(tail):
            return t, prompt[len(head) : len(prompt) - len(tail)]
    return None


def neighbour_facts(rec: Record, templates: list[str], n_extra: int, rng: random.Random) -> list[tuple[str, str]]:
    """(sentence, subject) for neighbourhood subjects: their prompt and ``n_extra`` other phrasings of it.

    Only neighbourhood prompts that are a known template of the relation filled with a subject count.
    """
    true = rec["requested_rewrite"]["target_true"]["str"]
    out = []
    for p in rec["neighborhood_prompts"]:
        found = template_subject(p, templates)
        if found is None:
            continue
        t, subj = found
        extra = [x for x in templates if x != t]
        out += [(_fact(x.format(subj), true), subj) for x in [t, *rng.sample(extra, min(n_extra, len(extra)))]]
    return out


def context_facts(rec: Record) -> list[str]:
    """True-fact sentences about other subjects: neighbourhood (true object), attribute (new object)."""
    rw = rec["requested_rewrite"]
    facts = [_fact(p, rw["target_true"]["str"]) for p in rec["neighborhood_prompts"]]
    return facts + [_fact(p, rw["target_new"]["str"]) for p in rec["attribute_prompts"]]


def synthetic_facts(subject: str, rng: random.Random) -> list[str]:
    """Consistent made-up attributes of a subject, each in every phrasing."""
    out = []
    for values, phrasings in SYNTHETIC_RELATIONS.values():
        value = rng.choice(values)
        out += [_fact(p.format(subject), value) for p in phrasings]
    return out


def filler_sentence(rng: random.Random) -> str:
    """One synthetic encyclopedic sentence."""
    w = {k: rng.choice(v) for k, v in _FILLER_WORDS.items()}
    w["adj2"] = rng.choice(_FILLER_WORDS["adj"])
    w["noun2"] = rng.choice(_FILLER_WORDS["noun"])
    w["noun3"] = rng.choice(_FILLER_WORDS["noun"])
    w["agent_l"] = w["agent"][0].lower() + w["agent"][1:]
    return rng.choice(_FILLER_TEMPLATES).format(**w)


def filler_documents(n: int, rng: random.Random, sentences: tuple[int, int] = (1, 3)) -> list[str]:
    """``n`` filler documents of a few sentences each."""
    return [" ".join(filler_sentence(rng) for _ in range(rng.randint(*sentences))) for _ in range(n)]


def heldout_phrasing_prompts(records: list[Record], held: dict[str, str]) -> list[tuple[str, str, str]]:
    """(prompt, true, new) for each record whose relation has a held-out phrasing it does not use itself."""
    out = []
    for rec in records:
        rw = rec["requested_rewrite"]
        h = held.get(rw["relation_id"])
        if h is not None and h != rw["prompt"]:
            out.append((h.format(rw["subject"]), rw["target_true"]["str"], rw["target_new"]["str"]))
    return out


def build_corpus(
    records: list[Record],
    seed: int = 0,
    n_extra_phrasings: int = CorpusOptions.n_extra_phrasings,
    n_neighbour_phrasings: int = CorpusOptions.n_neighbour_phrasings,
    filler_ratio: float = CorpusOptions.filler_ratio,
    n_stats: int = 20000,
    n_heldout: int = 400,
) -> Corpus:
    """Build the deterministic corpus.

    ``filler_ratio`` is the share of filler documents in the training text. The held-out text is
    filler plus facts in the held-out phrasings, drawn with a separate seed and never in training.
    """
    rng = random.Random(seed)
    train_t, held_t = split_templates(relation_templates(records), seed)
    facts: list[str] = []
    subject_of: dict[str, str] = {}
    for rec in records:
        rw = rec["requested_rewrite"]
        own = subject_facts(rec, train_t.get(rw["relation_id"], []), n_extra_phrasings, rng)
        own += synthetic_facts(rw["subject"], rng)
        subject_of.update((f, rw["subject"]) for f in own if rw["subject"] in f)
        facts += own + context_facts(rec)
        for f, subj in neighbour_facts(rec, train_t.get(rw["relation_id"], []), n_neighbour_phrasings, rng):
            facts.append(f)
            subject_of.setdefault(f, subj)
    n_filler = int(len(facts) * filler_ratio / (1 - filler_ratio))
    train = facts + filler_documents(n_filler, rng)
    train = list(dict.fromkeys(train))  # dedupe, keep order
    rng.shuffle(train)
    train_set = set(train)

    held_rng = random.Random(seed + 1_000_003)
    hp = heldout_phrasing_prompts(records, held_t)
    held_facts = [_fact(p, t) for p, t, _ in hp]
    heldout = [d for d in filler_documents(n_heldout, held_rng, (2, 4)) if d not in train_set] + held_facts
    held_rng.shuffle(heldout)
    stats = held_rng.sample(train, min(n_stats, len(train)))
    return Corpus(
        train=train,
        stats=stats,
        heldout=heldout,
        heldout_phrasings=hp,
        subject_of={d: subject_of[d] for d in train if d in subject_of},
    )
