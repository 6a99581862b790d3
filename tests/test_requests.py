"""Request parsing: the three formats, JSON and JSON Lines, and a clear error for every bad record."""

from __future__ import annotations

import json

import pytest

from conftest import word_tokenizer
from editflow.requests import (RequestError, check_tokenizable, load_requests, parse_request_text,
                               parse_requests, requests_digest)

PLAIN = {"prompt": "{} plays", "subject": "alpha", "target_new": "chess", "target_true": "golf"}
CF = {"case_id": 7, "requested_rewrite": {"prompt": "{} lives in", "subject": "beta gamma",
                                          "target_new": {"str": "Paris", "id": "Q1"},
                                          "target_true": {"str": "Rome", "id": "Q2"}},
      "paraphrase_prompts": ["p1"], "neighborhood_prompts": ["n1", "n2"], "attribute_prompts": [],
      "generation_prompts": ["g"]}
ZSRE = {"subject": "IAAF Combined Events Challenge", "src": "When was the inception of IAAF Combined Events Challenge?",
        "rephrase": "When was the IAAF Combined Events Challenge launched?", "alt": "2006",
        "answers": ["1998"], "loc": "nq question: who", "loc_ans": "me"}


def test_three_formats():
    plain, cf, zsre = parse_requests([PLAIN, CF, ZSRE])
    assert (plain.text, plain.target_new, plain.target_true) == ("alpha plays", "chess", "golf")
    assert (cf.prompt, cf.subject, cf.target_new, cf.target_true, cf.case_id) == ("{} lives in", "beta gamma", "Paris", "Rome", "7")
    assert cf.neighborhood_prompts == ("n1", "n2") and cf.source_format == "counterfact"
    assert zsre.prompt == "When was the inception of {}?" and zsre.text == ZSRE["src"]
    assert (zsre.target_new, zsre.target_true, zsre.loc_ans, zsre.paraphrase_prompts) == ("2006", "1998", "me", (ZSRE["rephrase"],))


def test_json_and_jsonl_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([PLAIN, CF]))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [PLAIN, CF]) + "\n")
    (tmp_path / "noext").write_text("\n".join(json.dumps(r) for r in [PLAIN, CF]))
    a, b, c = (load_requests(tmp_path / n) for n in ("a.json", "a.jsonl", "noext"))
    assert a == b == c and len(a) == 2
    assert requests_digest(a) == requests_digest(b)
    assert parse_request_text(json.dumps({"requests": [PLAIN]}))[0].subject == "alpha"


@pytest.mark.parametrize("record, index, field, message", [
    ({**PLAIN, "prompt": "no placeholder"}, 1, "prompt", "exactly one"),
    ({**PLAIN, "prompt": "{} and {}"}, 1, "prompt", "exactly one"),
    ({k: v for k, v in PLAIN.items() if k != "subject"}, 1, "subject", "missing"),
    ({**PLAIN, "subject": "  "}, 1, "subject", "empty"),
    ({**PLAIN, "target_new": ""}, 1, "target_new", "empty"),
    ({**PLAIN, "target_new": 3}, 1, "target_new", "string"),
    ({**CF, "requested_rewrite": {**CF["requested_rewrite"], "subject": ""}}, 1, "requested_rewrite.subject", "empty"),
    ({**CF, "requested_rewrite": {**CF["requested_rewrite"], "prompt": "lives in"}}, 1, "requested_rewrite.prompt", "exactly one"),
    ({**ZSRE, "subject": "nowhere"}, 1, "src", "does not occur"),
    ({**PLAIN, "target_new": "tennis"}, 1, "target_new", "conflicts with record 0"),
    ("just a string", 1, None, "JSON object"),
])
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

    tok = word_tokenizer()  # a real tokenizer whose normaliser drops zero-width spaces and trims
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("\u200b", ""), normalizers.Strip()])
    reqs = parse_requests([PLAIN, {**PLAIN, "subject": "beta", "target_new": "\u200b"}])
    with pytest.raises(RequestError, match="tokenises to nothing") as err:
        check_tokenizable(reqs, tok)
    assert (err.value.index, err.value.field) == (1, "target_new")
