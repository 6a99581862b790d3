"""Request parsing: the three formats, JSON and JSON Lines, and a clear error for every bad record."""

from __future__ import annotations

import json

import pytest
from conftest import word_tokenizer

from editflow.requests import (
    MAX_REQUESTS,
    RequestError,
    check_lengths,
    check_tokenizable,
    context_template_allowance,
    load_requests,
    neighbor_index,
    parse_request_text,
    parse_requests,
    requests_digest,
    template_allowance,
)
from editflow.text import safe

PLAIN = {"prompt": "{} plays", "subject": "alpha", "target_new": "chess", "target_true": "golf"}
CF = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "{} lives in",
        "subject": "beta gamma",
        "target_new": {"str": "Paris", "id": "Q1"},
        "target_true": {"str": "Rome", "id": "Q2"},
    },
    "paraphrase_prompts": ["p1"],
    "neighborhood_prompts": ["n1", "n2"],
    "attribute_prompts": [],
    "generation_prompts": ["g"],
}
ZSRE = {
    "subject": "IAAF Combined Events Challenge",
    "src": "When was the inception of IAAF Combined Events Challenge?",
    "rephrase": "When was the IAAF Combined Events Challenge launched?",
    "alt": "2006",
    "answers": ["1998"],
    "loc": "nq question: who",
    "loc_ans": "me",
}


def test_three_formats():
    plain, cf, zsre = parse_requests([PLAIN, CF, ZSRE])
    assert (plain.text, plain.target_new, plain.target_true) == ("alpha plays", "chess", "golf")
    assert (cf.prompt, cf.subject, cf.target_new, cf.target_true, cf.case_id) == (
        "{} lives in",
        "beta gamma",
        "Paris",
        "Rome",
        "7",
    )
    assert cf.neighborhood_prompts == ("n1", "n2") and cf.source_format == "counterfact"
    assert zsre.prompt == "When was the inception of {}?" and zsre.text == ZSRE["src"]
    assert (zsre.target_new, zsre.target_true, zsre.loc_ans, zsre.paraphrase_prompts) == (
        "2006",
        "1998",
        "me",
        (ZSRE["rephrase"],),
    )


def test_json_and_jsonl_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([PLAIN, CF]))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [PLAIN, CF]) + "\n")
    (tmp_path / "noext").write_text("\n".join(json.dumps(r) for r in [PLAIN, CF]))
    a, b, c = (load_requests(tmp_path / n) for n in ("a.json", "a.jsonl", "noext"))
    assert a == b == c and len(a) == 2
    assert requests_digest(a) == requests_digest(b)
    assert parse_request_text(json.dumps({"requests": [PLAIN]}))[0].subject == "alpha"


@pytest.mark.parametrize(
    "record, index, field, message",
    [
        ({**PLAIN, "prompt": "no placeholder"}, 1, "prompt", "exactly one"),
        ({**PLAIN, "prompt": "{} and {}"}, 1, "prompt", "exactly one"),
        ({k: v for k, v in PLAIN.items() if k != "subject"}, 1, "subject", "missing"),
        ({**PLAIN, "subject": "  "}, 1, "subject", "empty"),
        ({**PLAIN, "target_new": ""}, 1, "target_new", "empty"),
        ({**PLAIN, "target_new": 3}, 1, "target_new", "string"),
        (
            {**CF, "requested_rewrite": {**CF["requested_rewrite"], "subject": ""}},
            1,
            "requested_rewrite.subject",
            "empty",
        ),
        (
            {**CF, "requested_rewrite": {**CF["requested_rewrite"], "prompt": "lives in"}},
            1,
            "requested_rewrite.prompt",
            "exactly one",
        ),
        ({**ZSRE, "subject": "nowhere"}, 1, "src", "does not occur"),
        ({**PLAIN, "target_new": "tennis"}, 1, "target_new", "conflicts with record 0"),
        ("just a string", 1, None, "JSON object"),
    ],
)
def test_bad_records_name_index_and_field(record, index, field, message):
    with pytest.raises(RequestError, match=message) as err:
        parse_requests([PLAIN, record])
    assert err.value.index == index and err.value.field == field
    assert f"record {index}" in str(err.value)


def test_exact_duplicates_are_merged():
    assert len(parse_requests([PLAIN, dict(PLAIN)])) == 1


def test_non_utf8_and_bad_json(tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(json.dumps([PLAIN]).encode().replace(b"alpha", b"alph\xe9"))
    with pytest.raises(RequestError, match="not UTF-8"):
        load_requests(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "{}"')
    with pytest.raises(RequestError, match="invalid JSON"):
        load_requests(broken)
    lines = tmp_path / "broken.jsonl"
    lines.write_text(json.dumps(PLAIN) + "\n{oops\n")
    with pytest.raises(RequestError, match="line 2") as err:
        load_requests(lines)
    assert err.value.index == 1
    with pytest.raises(RequestError, match="does not exist"):
        load_requests(tmp_path / "missing.json")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(RequestError, match="no requests"):
        load_requests(empty)


def test_target_that_tokenises_to_nothing():
    from tokenizers import normalizers

    tok = word_tokenizer()  # a real tokenizer whose normaliser drops "~" and trims
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("~", ""), normalizers.Strip()])
    reqs = parse_requests([PLAIN, {**PLAIN, "subject": "beta", "target_new": "~~"}])
    with pytest.raises(RequestError, match="tokenises to nothing") as err:
        check_tokenizable(reqs, tok)
    assert (err.value.index, err.value.field) == (1, "target_new")
    check_tokenizable(reqs[:1], tok)


def test_invisible_targets_are_rejected_before_the_tokenizer():
    for target in ("\u200b", "\u2060\ufeff", "\u00a0"):
        with pytest.raises(RequestError, match="empty") as err:
            parse_requests([{**PLAIN, "target_new": target}])
        assert (err.value.index, err.value.field) == (0, "target_new")


def test_special_tokens_of_the_tokenizer():
    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["[[SEP]]"]})
    for field_name, value in (
        ("target_new", "[[SEP]]"),
        ("target_true", "Rome [[SEP]]"),
        ("subject", "alpha[[SEP]]"),
        ("target_new", "<eos>"),
    ):
        reqs = parse_requests([{**PLAIN, field_name: value}]) if value != "<eos>" else None
        if reqs is None:  # <eos> is caught by the parser already
            with pytest.raises(RequestError, match="special token"):
                parse_requests([{**PLAIN, field_name: value}])
            continue
        with pytest.raises(RequestError, match="special token") as err:
            check_tokenizable(reqs, tok)
        assert (err.value.index, err.value.field) == (0, field_name)
    # unknown words map onto <eos> here: not "a special token", but nothing is left of the target
    with pytest.raises(RequestError, match="tokenises to nothing"):
        check_tokenizable(parse_requests([{**PLAIN, "target_new": "zzz unknown"}]), tok)
    check_tokenizable(parse_requests([{**PLAIN, "target_new": "zzz chess"}]), tok)


def test_target_equal_to_target_true():
    with pytest.raises(RequestError, match="equals target_true") as err:
        parse_requests([PLAIN, {**PLAIN, "subject": "beta", "target_new": " golf", "target_true": "golf"}])
    assert (err.value.index, err.value.field) == (1, "target_new")


@pytest.mark.parametrize(
    "field_name, value, needle",
    [
        ("prompt", "{} pl\x00ays", "U+0000"),
        ("subject", "al\x1bpha", "U+001B"),
        ("target_new", "ch\x85ess", "U+0085"),
        ("target_new", "x\ud800", "surrogate"),
        ("subject", "a\nb", "U+000A"),
    ],
)
def test_control_characters_and_surrogates(field_name, value, needle):
    import re

    with pytest.raises(RequestError, match=re.escape(needle)) as err:
        parse_requests([{**PLAIN, field_name: value}])
    assert err.value.field == field_name and "\x00" not in str(err.value) and "\x1b" not in str(err.value)
    assert parse_requests([{**PLAIN, "prompt": "Q:\t{}\nA:"}])[0].prompt == "Q:\t{}\nA:"


def test_safe_escapes_and_truncates():
    assert safe("a\x00b\x1b[31m\u200b\ud800") == "'a\\x00b\\x1b[31m\\u200b\\ud800'"
    long = safe("x" * 1_000_000)
    assert len(long) < 120 and long.endswith("(1,000,000 characters)")
    assert safe("Józef") == "'Józef'"
    with pytest.raises(RequestError) as err:
        parse_requests([{**PLAIN, "prompt": "y" * 1_000_000}])
    assert len(str(err.value)) < 300


def test_request_cap(tmp_path):
    records = [{**PLAIN, "subject": f"s{i}"} for i in range(12)]
    with pytest.raises(RequestError, match="12 requests or more, over the limit of 10"):
        parse_requests(records, max_requests=10)
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(RequestError, match="over the limit of 10 "):
        load_requests(tmp_path / "r.jsonl", max_requests=10)
    assert len(load_requests(tmp_path / "r.jsonl", max_requests=12)) == 12
    assert len(load_requests(tmp_path / "r.jsonl", max_requests=None)) == 12
    assert MAX_REQUESTS == 10_000


def test_file_kinds_and_size_cap(tmp_path):
    import os

    good = tmp_path / "good.json"
    good.write_text(json.dumps([PLAIN]))
    with pytest.raises(RequestError, match="over the limit of 10 bytes"):
        load_requests(good, max_bytes=10)
    os.mkfifo(tmp_path / "pipe.json")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    os.symlink(tmp_path / "b.json", tmp_path / "a.json")
    os.symlink(tmp_path / "a.json", tmp_path / "b.json")
    (tmp_path / "dir.json").mkdir()
    for name, message in (
        ("pipe.json", "named pipe"),
        ("zero.json", "a device"),
        ("a.json", "symlink loop"),
        ("dir.json", "a directory"),
        ("nope.json", "does not exist"),
    ):
        with pytest.raises(RequestError, match=message):
            load_requests(tmp_path / name)


def test_deeply_nested_json():
    with pytest.raises(RequestError, match="nested too deeply"):
        parse_request_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RequestError, match="nested too deeply") as err:
        parse_request_text(json.dumps(PLAIN) + "\n" + "[" * 100_000 + "]" * 100_000, jsonl=True)
    assert err.value.index == 1


def test_check_lengths_names_record_and_field():
    tok = word_tokenizer()
    reqs = parse_requests(
        [
            PLAIN,
            {**PLAIN, "subject": "beta", "prompt": "{} " + "is a " * 20},
            {**PLAIN, "subject": "gamma", "target_new": "red " * 30},
        ]
    )
    check_lengths(reqs[:1], tok, 8)
    with pytest.raises(RequestError, match="exceed the model's 30 positions") as err:
        check_lengths(reqs, tok, 30)
    assert (err.value.index, err.value.field) == (1, "prompt")
    with pytest.raises(RequestError) as err:
        check_lengths(reqs[::2], tok, 30)
    assert (err.value.index, err.value.field) == (1, "target_new")
    with pytest.raises(RequestError, match="context template allowance 18") as err:
        check_lengths(reqs[:1], tok, 8, context_template_allowance(5, 10))
    assert context_template_allowance(0, 10) == 0
    assert template_allowance(tok, ["{}", "The red. {}", "I . {}"]) == 4  # the, red, ".", trailing space
    check_lengths(reqs, tok, None)
    # evaluation prompts are cut on the left when scored: never a reason to refuse
    check_lengths(parse_requests([{**PLAIN, "paraphrase_prompts": ["alpha " * 40]}]), tok, 30)


# ----------------------------------------------------------------------------- automatic neighbours


def test_neighbor_index_equals_auto_neighbor_texts_on_bundled_records():
    from pathlib import Path

    import editflow
    from editflow.evaluate.probes import auto_neighbor_texts

    records = json.loads((Path(editflow.__file__).parent / "assets/counterfact/records.json").read_text())
    reqs = parse_requests(records)
    # the same prompts and subjects shuffled together: repeated subjects, shared prompts, edited pairs
    plain = parse_requests(
        [
            {"prompt": r.prompt, "subject": s, "target_new": "x"}
            for k, r in enumerate(reqs)
            for s in (r.subject, reqs[(k * 7) % 11].subject)
        ]
    )
    for rs in (reqs, plain, reqs[:1], reqs[:2]):
        for n in (0, 1, 5, 50):
            assert neighbor_index(rs, n) == [auto_neighbor_texts(rs, i, n) for i in range(len(rs))]


def synthetic(n: int, subjects: int, prompts: int, seed: int = 0) -> list:
    """``n`` distinct (subject, prompt) requests drawn from ``subjects`` × ``prompts`` (built directly: fast)."""
    import random

    from editflow.requests import EditRequest

    rng = random.Random(seed)
    keys = rng.sample(range(subjects * prompts), n)
    return [
        EditRequest(prompt=f"{{}} relation {k % prompts}", subject=f"S{k // prompts}", target_new="x") for k in keys
    ]


def test_neighbor_index_matches_on_synthetic_edge_cases():
    from editflow.evaluate.probes import auto_neighbor_texts

    runs = sorted(synthetic(200, 40, 60, seed=3), key=lambda r: r.subject)  # runs of one subject
    for rs in (synthetic(15, 5, 3), synthetic(300, 300, 1), synthetic(200, 40, 60, seed=2), runs):
        assert neighbor_index(rs, 5) == [auto_neighbor_texts(rs, i, 5) for i in range(len(rs))]


def test_neighbor_index_is_fast_on_100k_records():
    import time

    for rs in (synthetic(100_000, 30_000, 50), synthetic(100_000, 100_000, 1)):
        start = time.perf_counter()
        out = neighbor_index(rs, 5)
        assert len(out) == 100_000 and time.perf_counter() - start < 20
