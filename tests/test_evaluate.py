"""Evaluation: scoring core, metrics, fluency, drift, reports and ``editflow eval`` on a real tiny GPT-2.

Expected values are computed independently here: one unpadded forward per prompt, NLLs by hand.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from click.testing import CliRunner  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from editflow.evaluate import (  # noqa: E402
    Evaluator,
    drift,
    drift_reference,
    drift_texts,
    fact_table,
    greedy_answers,
    harmonic_mean,
    load_heldout_texts,
    load_pre_state,
    ngram_entropy,
    save_pre_state,
    score_targets,
    summary,
    text_entropy,
    unrelated_texts,
    weighted_ngram_entropy,
    words,
    write_report,
)
from editflow.evaluate.scoring import shared_rows  # noqa: E402
from editflow.generation import complete, decode  # noqa: E402
from editflow.requests import parse_requests  # noqa: E402

WORDS = (
    "<eos> the capital of France Germany Italy Spain is Paris Rome Berlin Madrid city plays sport "
    "football basketball tennis LeBron James Serena Williams what a b c"
).split()


@pytest.fixture(scope="module")
def lm():
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(WORDS),
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        initializer_range=0.4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval(), tok


def direct(model, tok, prefix: str, target: str) -> tuple[float, bool, float]:
    """(mean NLL, all-argmax, token accuracy) of " "+target after prefix: one unpadded forward."""
    p = tok(prefix)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].double(), -1)
    nll = [-logp[len(p) - 1 + k, tok_id].item() for k, tok_id in enumerate(t)]
    hits = [int(logp[len(p) - 1 + k].argmax()) == tok_id for k, tok_id in enumerate(t)]
    return sum(nll) / len(t), all(hits), sum(hits) / len(t)


def greedy(model, tok, prefix: str, n: int) -> list[int]:
    ids = tok(prefix)["input_ids"]
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
    return out


PAIRS = [
    ("the capital of France is", "Paris"),
    ("LeBron James plays the sport", "basketball tennis"),
    ("what", "Rome Berlin Madrid city"),
    ("the capital of Germany is", "Berlin"),
]


# --------------------------------------------------------------------------- scoring core


@pytest.mark.parametrize("kwargs", [{}, {"padding_side": "left"}, {"one_by_one": True}, {"batch_rows": 3}])
def test_scores_match_direct_forward(lm, kwargs):
    model, tok = lm
    s = score_targets(model, tok, PAIRS, **kwargs)
    for k, (p, t) in enumerate(PAIRS):
        nll, top1, acc = direct(model, tok, p, t)
        assert s.nll[k] == pytest.approx(nll, abs=1e-5)
        assert bool(s.top1[k]) == top1 and s.token_acc[k] == pytest.approx(acc)
    assert list(s.n_tokens) == [1, 2, 4, 1]
    for k, (p, t) in enumerate(PAIRS):  # rank of the first target token among next-token logits
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        first = tok(" " + t, add_special_tokens=False)["input_ids"][0]
        assert s.rank[k] == int((logits > logits[first]).sum())


def test_shared_rows_cover_every_sequence():
    seqs = [(1, 2), (1, 2, 3), (1,), (4, 5), (1, 2), (4,), (1, 3)]
    rows, where = shared_rows(seqs)
    assert sorted(rows) == [(1, 2, 3), (1, 3), (4, 5)]
    assert all(rows[w][: len(s)] == s for s, w in zip(seqs, where))


def test_greedy_decode_and_complete_match_plain_greedy(lm):
    model, tok = lm
    prompts = ["the capital of", "what", "LeBron James plays the sport", "a"]
    ids = [tok(p)["input_ids"] for p in prompts]
    expected = [greedy(model, tok, p, 4) for p in prompts]
    assert decode(model, ids, 0, 4, batch_rows=3) == expected
    assert complete(model, tok, prompts, max_new_tokens=4) == [
        tok.decode(e[: e.index(0)] if 0 in e else e, skip_special_tokens=True) for e in expected
    ]


def test_padding_invariance(lm):
    model, tok = lm
    right, left = (score_targets(model, tok, PAIRS, padding_side=side) for side in ("right", "left"))
    np.testing.assert_allclose(right.nll, left.nll, atol=1e-5)
    assert (right.top1 == left.top1).all() and (right.token_acc == left.token_acc).all()


def test_top1_and_token_accuracy_on_greedy_answer(lm):
    model, tok = lm
    ids = greedy(model, tok, "the capital of", 3)
    target = tok.decode(ids).strip()
    assert tok(" " + target, add_special_tokens=False)["input_ids"] == ids
    s = score_targets(model, tok, [("the capital of", target)])
    assert s.top1[0] and s.token_acc[0] == 1.0
    prefixes = [tok("the capital of")["input_ids"], tok("what")["input_ids"]]
    assert greedy_answers(model, prefixes, [3, 2], 0) == [tuple(ids), tuple(greedy(model, tok, "what", 2))]


# --------------------------------------------------------------------------- metrics


CF = [
    {
        "case_id": 1,
        "requested_rewrite": {
            "prompt": "the capital of {} is",
            "subject": "France",
            "target_new": {"str": "Rome"},
            "target_true": {"str": "Paris"},
        },
        "paraphrase_prompts": ["France capital is", "what is the capital of France"],
        "neighborhood_prompts": ["the capital of Germany is", "the capital of Spain is"],
        "generation_prompts": ["France is"],
    },
    {
        "case_id": 2,
        "requested_rewrite": {
            "prompt": "{} plays the sport",
            "subject": "LeBron James",
            "target_new": {"str": "tennis football"},
            "target_true": {"str": "basketball"},
        },
        "paraphrase_prompts": ["LeBron James plays"],
        "neighborhood_prompts": ["Serena Williams plays the sport"],
        "generation_prompts": ["LeBron James is"],
    },
]


def test_counterfact_metrics_hand_checked(lm):
    model, tok = lm
    reqs = parse_requests(CF)
    res = Evaluator((model, tok), reqs, fluency=False).pre()
    es, em, e1, ps, ns = [], [], [], [], []
    for r in reqs:
        (nn_, t_new, _), (nt, _, _) = (
            direct(model, tok, r.text, r.target_new),
            direct(model, tok, r.text, r.target_true),
        )
        es.append(nn_ < nt)
        em.append(math.exp(-nn_) - math.exp(-nt))
        e1.append(t_new)
        ps.append(
            np.mean(
                [
                    direct(model, tok, p, r.target_new)[0] < direct(model, tok, p, r.target_true)[0]
                    for p in r.paraphrase_prompts
                ]
            )
        )
        ns.append(
            np.mean(
                [
                    direct(model, tok, p, r.target_true)[0] < direct(model, tok, p, r.target_new)[0]
                    for p in r.neighborhood_prompts
                ]
            )
        )
    m = res.metrics
    assert m["efficacy"] == pytest.approx(100 * np.mean(es))
    assert m["efficacy_magnitude"] == pytest.approx(100 * np.mean(em), abs=1e-4)
    assert m["efficacy_top1"] == pytest.approx(100 * np.mean(e1))
    assert m["paraphrase"] == pytest.approx(100 * np.mean(ps))
    assert m["neighborhood"] == pytest.approx(100 * np.mean(ns))
    assert m["score"] == pytest.approx(harmonic_mean([m["efficacy"], m["paraphrase"], m["neighborhood"]]))
    assert res.facts.loc[1, "p_new"] == pytest.approx(
        math.exp(-direct(model, tok, reqs[1].text, "tennis football")[0]), rel=1e-5
    )


def test_harmonic_mean():
    assert harmonic_mean([50.0, 100.0, 100.0]) == pytest.approx(75.0)
    assert harmonic_mean([0.0, 100.0, 100.0]) == 0.0


def test_plain_request_gets_efficacy_and_specificity(lm):
    model, tok = lm
    reqs = parse_requests(
        [
            {"prompt": "the capital of {} is", "subject": "France", "target_new": "Rome Berlin"},
            {"prompt": "{} plays the sport", "subject": "Serena Williams", "target_new": "football"},
        ]
    )
    heldout = parse_requests(
        [{"prompt": "the capital of {} is", "subject": "Italy", "target_new": "Paris", "target_true": "Rome"}]
    )
    res = Evaluator((model, tok), reqs, heldout_facts=heldout, heldout_known_only=False, fluency=False).pre()
    # Efficacy against the pre-edit greedy answer (as many tokens as the new target).
    expected = []
    for r, n in zip(reqs, (2, 1)):
        ans = tok.decode(greedy(model, tok, r.text, n))
        expected.append(direct(model, tok, r.text, r.target_new)[0] < direct(model, tok, r.text, ans)[0])
    assert res.metrics["efficacy"] == pytest.approx(100 * np.mean(expected))
    # Automatic neighbours: own prompt with the other request's subject; pre-edit answer is top-1 by construction.
    auto = res.checks[res.checks["kind"] == "neighborhood_auto"]
    assert sorted(auto["text"]) == ["France plays the sport", "the capital of Serena Williams is"]
    assert res.metrics["neighborhood_auto_top1"] == 100.0 and "neighborhood_auto" in res.metrics
    # Held-out facts: does the model still prefer target_true over target_new?
    prefers = direct(model, tok, heldout[0].text, "Rome")[0] < direct(model, tok, heldout[0].text, "Paris")[0]
    assert res.metrics["heldout"] == 100.0 * prefers and res.metrics["n_heldout"] == 1
    # known_only keeps the facts the model knows: prefers target_true, whose first token ranks < 50.
    res2 = Evaluator((model, tok), reqs, heldout_facts=heldout, fluency=False).pre()
    assert res2.metrics["n_heldout"] == float(prefers)


def test_zsre_token_accuracy(lm):
    model, tok = lm
    src = "what is the capital of France"
    loc_ans = tok.decode(greedy(model, tok, "what a b", 2))  # token accuracy 1 by construction
    alt = tok.decode(greedy(model, tok, src, 1)) + " c"  # first token right: accuracy >= 1/2
    reqs = parse_requests(
        [
            {
                "subject": "France",
                "src": src,
                "alt": alt,
                "answers": ["Paris"],
                "rephrase": "the capital of France is",
                "loc": "what a b",
                "loc_ans": loc_ans,
            }
        ]
    )
    m = Evaluator((model, tok), reqs, fluency=False).pre().metrics
    assert m["zsre_efficacy"] == pytest.approx(100 * direct(model, tok, src, alt)[2]) and m["zsre_efficacy"] >= 50
    assert m["zsre_paraphrase"] == pytest.approx(100 * direct(model, tok, "the capital of France is", alt)[2])
    assert m["zsre_specificity"] == 100.0
    assert "efficacy" not in m


# --------------------------------------------------------------------------- fluency


def test_probe_longer_than_the_model_is_left_out_and_counted(lm):
    """A zsRE locality answer longer than the model's 32 positions is not scored (it would fail the
    run after the statistics); the rest of the record still is."""
    model, tok = lm
    record = {
        "subject": "France",
        "src": "what is the capital of France",
        "alt": "Paris c",
        "answers": ["Paris"],
        "loc": "what a b",
        "loc_ans": " ".join(["a"] * 40),
    }
    ev = Evaluator((model, tok), parse_requests([record]), fluency=False)
    m = ev.pre().metrics
    assert ev.skipped_probes == 1
    assert "zsre_specificity" not in m and m["zsre_efficacy"] >= 0


def test_ngram_entropy_by_hand():
    toks = ["a", "b", "a", "b", "a"]
    h2 = 1.0  # bigrams ab, ba, ab, ba
    h3 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)  # aba, bab, aba
    assert ngram_entropy(toks, 2) == pytest.approx(h2) and ngram_entropy(toks, 3) == pytest.approx(h3)
    assert weighted_ngram_entropy(toks) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert words("a b, a b a") == ["a", "b", ",", "a", "b", "a"]
    assert text_entropy(["a b a b a", "a a a"]) == pytest.approx(((2 / 3 * h2 + 4 / 3 * h3) / 2 + 0.0) / 2)


def test_fluency_is_seeded(lm):
    model, tok = lm
    reqs = parse_requests(CF)
    a = Evaluator((model, tok), reqs, fluency_tokens=12).pre()
    b = Evaluator((model, tok), reqs, fluency_tokens=12).pre()
    assert a.metrics["fluency"] == b.metrics["fluency"] and 0 < a.metrics["fluency"] < 800


def test_fluency_beyond_its_cap_is_the_uncapped_figure_on_a_seeded_sample(lm):
    model, tok = lm
    reqs = parse_requests(CF) * 3  # six facts
    every = Evaluator((model, tok), reqs, fluency_tokens=12, fluency_max=0)
    capped = Evaluator((model, tok), reqs, fluency_tokens=12, fluency_max=2)
    assert Evaluator((model, tok), reqs, fluency_max=6).fluency_facts() == every.fluency_facts() == list(range(6))
    sample = capped.fluency_facts()
    assert len(sample) == 2 and sample == Evaluator((model, tok), reqs, fluency_max=2).fluency_facts()
    # sampling draws depend on the batch (editflow.generation), so the reference is the uncapped
    # evaluator on exactly the sampled facts, in order
    alone = Evaluator((model, tok), [reqs[i] for i in sample], fluency_tokens=12, fluency_max=0).pre()
    res = capped.pre()
    assert res.metrics["fluency"] == pytest.approx(alone.metrics["fluency"], rel=1e-12)
    assert res.metrics["efficacy"] == every.pre().metrics["efficacy"]
    assert res.facts["fluency"].notna().sum() == 2
    assert capped.pre_key("w") != every.pre_key("w")  # a different figure: a different cache entry


# --------------------------------------------------------------------------- drift


TEXTS = ["the capital of France is Paris", "LeBron James plays the sport basketball", "what a b c a b"]


def test_drift_zero_then_positive(lm):
    model, tok = lm
    ref = drift_reference(model, tok, TEXTS, top_k=4)
    assert ref.n_tokens == 5 + 5 + 5
    d = drift(model, tok, ref)
    assert d["kl"] == pytest.approx(0.0, abs=1e-9) and d["ppl_rel"] == pytest.approx(0.0, abs=1e-9)
    w = model.transformer.h[1].mlp.c_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(torch.randn_like(w, generator=torch.Generator().manual_seed(1)))
        d = drift(model, tok, ref)
        assert d["kl"] > 1e-4 and d["ppl_rel"] != 0.0
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_unrelated_texts_leave_out_every_mention_of_a_subject():
    texts = ["Paris is in France.", "The river flows.", "the eiffel tower is tall.", "A quiet garden."]
    assert unrelated_texts(texts, ["Eiffel Tower", "Paris", " "]) == ["The river flows.", "A quiet garden."]
    assert unrelated_texts(texts, []) == texts


def test_drift_texts_leave_out_edited_and_bundled_subjects(tmp_path):
    """Drift is measured on text about no edited subject (an edit should make its own facts less
    likely) and about no bundled record, so every batch from the bundled records sees the same slice."""
    from editflow import assets
    from editflow.requests import parse_requests

    bundled = json.loads(assets.counterfact_records_path().read_text())
    bundled_subject = bundled[0]["requested_rewrite"]["subject"]
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(
        f"{bundled_subject} was a scientist.\nZorblat Quennic lives in Oslo.\nA wide garden crosses the lake.\n"
    )
    (user,) = parse_requests([{"prompt": "{} lives in", "subject": "Zorblat Quennic", "target_new": "Rome"}])
    assert drift_texts([], heldout) == ["Zorblat Quennic lives in Oslo.", "A wide garden crosses the lake."]
    assert drift_texts([user], heldout) == ["A wide garden crosses the lake."]
    # the bundled text: the same slice for any two batches of bundled records
    a = parse_requests(bundled[:5])
    b = parse_requests(bundled[100:105])
    assert drift_texts(a) == drift_texts(b) and 0 < len(drift_texts(a)) < len(load_heldout_texts())


def test_drift_kl_exact_with_full_vocabulary(lm):
    model, tok = lm
    other = GPT2LMHeadModel(model.config).eval()  # another random model = an "edited" one
    ref = drift_reference(model, tok, TEXTS, top_k=len(WORDS))
    kls = []
    for text in TEXTS:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            p = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            q = torch.log_softmax(other(ids).logits[0, :-1].double(), -1)
        kls += (p.exp() * (p - q)).sum(-1).tolist()
    assert drift(other, tok, ref)["kl"] == pytest.approx(np.mean(kls), rel=1e-4)


# --------------------------------------------------------------------------- evaluator, report, CLI


def test_sequential_post_and_report(lm, tmp_path):
    model, tok = lm
    reqs = parse_requests(CF)
    ev = Evaluator((model, tok), reqs, heldout_texts=TEXTS, fluency=False)
    pre = ev.pre()
    w = model.transformer.h[0].mlp.c_proj.weight
    saved = w.detach().clone()
    try:
        first = ev.post(step=1, facts=[0])
        with torch.no_grad():
            w.mul_(3.0)
        second = ev.post(step=2)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert first.metrics["n_facts"] == 1 and second.metrics["n_facts"] == 2
    assert first.metrics["drift_kl"] == pytest.approx(0.0, abs=1e-9) and second.metrics["drift_kl"] > 0
    assert ev.pre() is pre and len(ev.history) == 2
    s = summary(pre, second)
    for key in (
        "pre/efficacy",
        "post/efficacy",
        "post/paraphrase",
        "post/neighborhood",
        "post/score",
        "pre/efficacy_magnitude",
        "post/efficacy_top1",
        "post/drift_ppl_rel",
        "post/drift_kl",
    ):
        assert key in s
    table = fact_table(reqs, pre, second)
    assert list(table["subject"]) == ["France", "LeBron James"]
    assert {"pre_p_new", "post_p_new", "pre_efficacy", "post_neighborhood"} <= set(table.columns)
    paths = write_report(tmp_path, table, s, ev.history)
    assert {"summary", "facts_csv", "facts_json", "probabilities", "curve"} <= set(paths)
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert json.loads(paths["summary"].read_text())["post/efficacy"] == s["post/efficacy"]


def test_saved_pre_state_replaces_pre(lm, tmp_path):
    model, tok = lm
    reqs = parse_requests(CF)
    heldout = parse_requests(
        [{"prompt": "the capital of {} is", "subject": "Italy", "target_new": "Paris", "target_true": "Rome"}]
    )
    kwargs = dict(heldout_texts=TEXTS, heldout_facts=heldout, heldout_known_only=False, fluency_tokens=8)
    ev = Evaluator((model, tok), reqs, **kwargs)
    assert ev.pre_key("abc") == Evaluator((model, tok), reqs, **kwargs).pre_key("abc") != ev.pre_key("abd")
    save_pre_state(ev.pre_state, tmp_path / "pre")
    state = load_pre_state(tmp_path / "pre")
    again = Evaluator((model, tok), reqs, **kwargs)
    assert again.pre(known=state).metrics == ev.pre().metrics
    assert again.checks == ev.checks and again.drift_ref.topk_ids[0].equal(ev.drift_ref.topk_ids[0])
    assert again.pre().facts.equals(ev.pre().facts) and again.pre().checks.equals(ev.pre().checks)
    w = model.transformer.h[0].mlp.c_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(2.0)
        assert again.post().metrics == ev.post().metrics
    finally:
        with torch.no_grad():
            w.copy_(saved)
    with pytest.raises(ValueError):
        Evaluator((model, tok), reqs[:1], **kwargs).pre(known=state)


def test_pre_state_and_known_facts_round_trip_through_mlflow(lm, tmp_path, monkeypatch):
    import mlflow

    from editflow.evaluate import find_known, find_pre_state, known_key, log_known, log_pre_state, select_known

    model, tok = lm
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    reqs = parse_requests(CF)
    ev = Evaluator((model, tok), reqs, heldout_texts=TEXTS, fluency=False)
    key = ev.pre_key("fingerprint-of-the-base")
    candidates = parse_requests(
        [
            {"prompt": "the capital of {} is", "subject": s, "target_new": "Paris", "target_true": t}
            for s, t in (("Italy", "Rome"), ("Spain", "Madrid"))
        ]
    )
    kkey = known_key("fingerprint-of-the-base", candidates)
    known = select_known(model, tok, candidates)
    assert find_pre_state(key) is None and find_known(kkey) is None
    experiment = mlflow.create_experiment("eval-cache", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        log_pre_state(ev.pre_state, key)
        log_known(known, kkey)
    state = find_pre_state(key)
    assert state is not None and state.result.metrics == ev.pre().metrics and state.checks == ev.checks
    assert find_known(kkey) == known


def test_cli_writes_outputs(lm, tmp_path):
    from editflow.cli import main

    model, tok = lm
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "reqs.json").write_text(json.dumps(CF))
    (tmp_path / "heldout.txt").write_text("\n".join(TEXTS))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            str(tmp_path / "model"),
            str(tmp_path / "reqs.json"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--heldout",
            str(tmp_path / "heldout.txt"),
            "--batch-size",
            "4",
            "--fluency-max",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "efficacy" in result.output and "fluency" in result.output
    facts = json.loads((out / "facts.json").read_text())
    assert len(facts) == 2 and sum(f.get("pre_fluency") is not None for f in facts) == 1  # one fact sampled
    for name in ("summary.json", "facts.csv", "facts.json", "prob_new_pre_vs_post.png"):
        assert (out / name).stat().st_size > 0
    s = json.loads((out / "summary.json").read_text())
    assert {"pre/efficacy", "pre/score", "pre/fluency", "pre/drift_ppl"} <= set(s)


# --------------------------------------------------------------------------- batched path vs a plain reference


MIXED = [
    {
        "case_id": 1,
        "requested_rewrite": {
            "prompt": "{} lives in",
            "subject": "alpha",
            "target_new": {"str": "Rome"},
            "target_true": {"str": "Paris"},
        },
        "paraphrase_prompts": ["The alpha lives in", "I alpha lives in"],
        "neighborhood_prompts": ["beta lives in", "gamma lives in", "The gamma lives in"],
        "generation_prompts": ["alpha plays", "alpha is"],
    },
    {
        "case_id": 2,
        "requested_rewrite": {
            "prompt": "{} plays",
            "subject": "delta",
            "target_new": {"str": "tennis chess"},
            "target_true": {"str": "football"},
        },
        "paraphrase_prompts": ["The delta plays"],
        "neighborhood_prompts": ["beta plays"],
        "generation_prompts": [],
    },
    {"prompt": "{} is", "subject": "epsilon", "target_new": "red green"},
    {"prompt": "{} lives in", "subject": "zeta", "target_new": "London"},
    {
        "subject": "eta",
        "src": "eta lives in",
        "alt": "Berlin Madrid",
        "answers": ["Madrid"],
        "rephrase": "The eta lives in",
        "loc": "theta plays",
        "loc_ans": "golf piano",
    },
]
HELDOUT = [
    {"prompt": "{} lives in", "subject": s, "target_new": n, "target_true": t}
    for s, t, n in (
        ("iota", "Paris", "London"),
        ("kappa", "Rome", "Berlin"),
        ("lambda", "Madrid", "Paris"),
        ("mu", "London", "Rome Berlin"),
        ("nu", "Berlin", "Madrid"),
        ("xi", "red", "blue"),
    )
]
DRIFT_TEXTS = ["alpha lives in Paris", "The beta plays tennis in London", "I is a the of in red green blue"]


def ref_logp(model, ids: list[int]) -> torch.Tensor:
    """(len, vocab) float64 next-token log-probs: one unpadded forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def ref_score(model, prefix: list[int], target: list[int]) -> tuple[float, float, float, int]:
    """(mean NLL, all-argmax, token accuracy, rank of the first token) of target after prefix."""
    logp = ref_logp(model, prefix + target)
    rows = [logp[len(prefix) - 1 + k] for k in range(len(target))]
    hits = [int(r.argmax()) == t for r, t in zip(rows, target)]
    nll = -sum(float(r[t]) for r, t in zip(rows, target)) / len(target)
    return nll, float(all(hits)), sum(hits) / len(hits), int((rows[0] > rows[0][target[0]]).sum())


def ref_greedy(model, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(ref_logp(model, ids + out)[-1].argmax()))
    return out


def ref_sample(model, prompts: list[list[int]], pad: int, n: int, top_k: int, seed: int, rows: int) -> list[list[int]]:
    """Top-k sampling without a KV cache: the whole left-padded batch forward at every step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(prompts), rows):
        part = prompts[start : start + rows]
        width = max(map(len, part))
        seqs = [[pad] * (width - len(p)) + p for p in part]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in part]
        new: list[list[int]] = [[] for _ in part]
        for _ in range(n):
            m = torch.tensor(mask)
            with torch.no_grad():
                logits = (
                    model(input_ids=torch.tensor(seqs), attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
                    .logits[:, -1]
                    .float()
                )
            top = logits.topk(top_k, dim=-1)
            pick = top.indices.gather(1, torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen))[:, 0]
            for i, t in enumerate(pick.tolist()):
                seqs[i].append(t), mask[i].append(1), new[i].append(t)
        out += new
    return out


def ref_drift_reference(model, seqs: list[list[int]], top_k: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    out = []
    for s in seqs:
        logp = ref_logp(model, s)[:-1]
        top = logp.topk(top_k, -1)
        out.append((top.indices, top.values, -float(logp.gather(1, torch.tensor(s[1:])[:, None]).sum())))
    return out


def ref_drift(model, seqs, ref) -> tuple[float, float]:
    """(summed NLL, summed top-k-coarsened KL(pre || post)) over all positions."""
    nll = kl = 0.0
    for s, (ids, p, _) in zip(seqs, ref):
        q_all = ref_logp(model, s)[:-1]
        nll -= float(q_all.gather(1, torch.tensor(s[1:])[:, None]).sum())
        q = q_all.gather(1, ids)
        p_rest, q_rest = 1 - p.exp().sum(-1), 1 - q.exp().sum(-1)
        kl += float(((p.exp() * (p - q)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).sum())
    return nll, kl


def reference_metrics(model, tok, reqs, facts, heldout, pre_answers, drift_state, phase) -> tuple[dict, dict]:
    """(every metric the Evaluator reports, P(new) per fact), computed prompt by prompt
    (``pre_answers``: (text, n) -> greedy ids of the unedited model)."""
    from editflow.evaluate.fluency import text_entropy
    from editflow.evaluate.probes import auto_neighbor_texts
    from editflow.tokens import encode, encode_target

    enc, tgt = (lambda t: encode(tok, t)), (lambda t: encode_target(tok, t))
    per: dict[str, dict[int, list[float]]] = {}

    def add(metric, i, v):
        per.setdefault(metric, {}).setdefault(i, []).append(float(v))

    def preference(metric, i, text, win, lose):
        (nw, t1, _, _), (nl, _, _, _) = ref_score(model, enc(text), win), ref_score(model, enc(text), lose)
        add(metric, i, nw < nl), add(metric + "_top1", i, t1)
        add(metric + "_magnitude", i, math.exp(-nw) - math.exp(-nl))
        return nw

    p_new = {}
    for i in facts:
        r = reqs[i]
        new = tgt(r.target_new)
        if r.source_format == "zsre":
            add("zsre_efficacy", i, ref_score(model, enc(r.text), new)[2])
            for p in r.paraphrase_prompts:
                add("zsre_paraphrase", i, ref_score(model, enc(p), new)[2])
            add("zsre_specificity", i, ref_score(model, enc(r.loc), tgt(r.loc_ans))[2])
            continue
        true = tgt(r.target_true) if r.target_true else list(pre_answers[r.text, len(new)])
        p_new[i] = math.exp(-preference("efficacy", i, r.text, new, true))
        for p in r.paraphrase_prompts:
            preference("paraphrase", i, p, new, true)
        for p in r.neighborhood_prompts:
            preference("neighborhood", i, p, true, new)
        if not r.neighborhood_prompts:
            for t in auto_neighbor_texts(reqs, i, 5):
                preference("neighborhood_auto", i, t, list(pre_answers[t, len(new)]), new)
    out = {m: 100 * float(np.mean([np.mean(v) for v in d.values()])) for m, d in per.items()}
    held: dict[str, list[float]] = {}
    for f in heldout:  # averaged over items, not facts
        s_true = ref_score(model, enc(f.text), tgt(f.target_true))
        s_new = ref_score(model, enc(f.text), tgt(f.target_new))
        for m, v in (
            ("heldout", s_true[0] < s_new[0]),
            ("heldout_top1", s_true[1]),
            ("heldout_magnitude", math.exp(-s_true[0]) - math.exp(-s_new[0])),
            ("heldout_prob", math.exp(-s_true[0])),
        ):
            held.setdefault(m, []).append(float(v))
    out.update({m: 100 * float(np.mean(v)) for m, v in held.items()})
    out["score"] = harmonic_mean([out["efficacy"], out["paraphrase"], out["neighborhood"]])
    prompts, owner = [], []
    for i in facts:
        chosen = list(dict.fromkeys(reqs[i].generation_prompts))[:1] or [reqs[i].text]
        prompts += [enc(p) for p in chosen]
        owner += [i] * len(chosen)
    texts = [
        tok.decode(p + n, skip_special_tokens=True)
        for p, n in zip(prompts, ref_sample(model, prompts, tok.pad_token_id, 12, 5, 0, 3))
    ]
    out["fluency"] = 100 * float(
        np.mean([np.mean([text_entropy([t]) for t, o in zip(texts, owner) if o == i]) for i in facts])
    )
    seqs, dref = drift_state
    n_tok = sum(len(s) - 1 for s in seqs)
    ppl_pre = math.exp(sum(r[2] for r in dref) / n_tok)
    if phase == "pre":
        out["drift_ppl"] = ppl_pre
    else:
        nll, kl = ref_drift(model, seqs, dref)
        ppl = math.exp(nll / n_tok)
        out.update(drift_ppl=ppl, drift_ppl_rel=ppl / ppl_pre - 1, drift_kl=kl / n_tok)
    out.update(n_facts=float(len(facts)), n_heldout=float(len(heldout)))
    return out, p_new


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_metric_matches_plain_reference(family):
    from conftest import tiny_model

    from editflow.evaluate.drift import heldout_sequences
    from editflow.evaluate.known import is_known
    from editflow.evaluate.probes import auto_neighbor_texts
    from editflow.tokens import encode, encode_target

    model, tok = tiny_model(family, seed=3)
    reqs, heldout = parse_requests(MIXED), parse_requests(HELDOUT)
    ev = Evaluator(
        (model, tok),
        reqs,
        heldout_texts=DRIFT_TEXTS,
        heldout_facts=heldout,
        fluency_tokens=12,
        batch_rows=3,
        drift_top_k=5,
    )
    pre = ev.pre()
    # Plain reference of the pre-edit material: greedy answers, known held-out facts, drift reference.
    answers = {}
    for i, r in enumerate(reqs):
        if r.source_format == "plain":
            n = len(encode_target(tok, r.target_new))
            for t in [r.text, *auto_neighbor_texts(reqs, i, 5)]:
                answers[t, n] = ref_greedy(model, encode(tok, t), n)
    known = []
    for f in heldout:
        (nt, _, _, rank), (nn_, _, _, _) = (
            ref_score(model, encode(tok, f.text), encode_target(tok, x)) for x in (f.target_true, f.target_new)
        )
        if is_known(np.array(nt), np.array(nn_), np.array(rank)):
            known.append(f)
    assert [c.text for c in ev.checks if c.kind == "heldout"] == [f.text for f in known] and known
    seqs = heldout_sequences(tok, DRIFT_TEXTS, 1024, 128)
    dstate = (seqs, ref_drift_reference(model, seqs, 5))
    facts = list(range(len(reqs)))

    def compare(res, phase):
        expected, p_new = reference_metrics(model, tok, reqs, facts, known, answers, dstate, phase)
        assert set(res.metrics) == set(expected), set(res.metrics) ^ set(expected)
        for k, v in expected.items():
            assert res.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-4), k  # float32 batched vs unbatched
        for i, p in p_new.items():
            assert res.facts.loc[i, "p_new"] == pytest.approx(p, rel=1e-5)

    compare(pre, "pre")
    w = next(p for n, p in model.named_parameters() if n.endswith(("1.mlp.c_proj.weight", "1.mlp.down_proj.weight")))
    with torch.no_grad():
        w.add_(torch.randn_like(w, generator=torch.Generator().manual_seed(5)) * 0.5)
    compare(ev.post(step=1), "post")
