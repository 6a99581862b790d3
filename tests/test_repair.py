"""The optional repair after MEMIT's solve (editflow.repair) on tiny random models: off means MEMIT
bit for bit; on, it lowers the corpus KL to the parent, keeps the deltas consistent with the weights,
and its preserve term holds the earlier edits' outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model
from test_memit import CFG, REQUESTS, direct_cov

from editflow import memit, repair
from editflow.config import MemitConfig
from editflow.edit_state import EditState
from editflow.models import detect_adapter
from editflow.requests import parse_requests
from editflow.tokens import pad_id

EARLIER = [{"prompt": "beta {}", "subject": "omega", "target_new": "tennis"}]


def corpus(tok, n: int = 12, length: int = 10, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, len(tok), (n, length), generator=g).tolist()


def solved(family: str = "gpt2", preserved=None):
    """A tiny model holding MEMIT's solve of REQUESTS, with everything the repair needs."""
    model, tok = tiny_model(family)
    adapter = detect_adapter(model)
    covs = direct_cov(model, adapter, tok, CFG.layers)
    reqs = parse_requests(REQUESTS)
    parent = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = memit.edit(model, tok, adapter, reqs, covs, CFG, keep_applied=True, preserved=preserved)
    return model, tok, adapter, covs, reqs, parent, result


def test_zero_steps_is_memit_unchanged():
    model, tok, adapter, covs, reqs, _, result = solved()
    held = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = repair.repair(model, tok, adapter, reqs, result, covs, CFG, corpus(tok))
    assert out is result
    assert all(torch.equal(p, held[n]) for n, p in model.named_parameters())


def test_target_rows_weigh_each_request_equally():
    _, tok = tiny_model()
    reqs = parse_requests(REQUESTS)
    rows = repair.target_rows(tok, reqs, ["{}", "x y. {}"])
    assert len(rows.ids) == 2 * len(reqs)
    assert sum(map(sum, rows.weights)) == pytest.approx(1.0)
    assert all(len(w) == len(i) and w[-1] > 0 for w, i in zip(rows.weights, rows.ids))


@pytest.mark.parametrize("conv1d", [True, False])
def test_preserved_change_is_the_output_change_on_the_keys(conv1d):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 8, generator=g)  # (n, d_ff)
    d = torch.randn(4, 8, generator=g)  # (d, d_ff): output change D k
    w = d.T.clone() if conv1d else d.clone()
    got = repair.preserved_change({"w": w}, {"w": torch.zeros_like(w)}, {"w": keys.T @ keys}, conv1d)
    want = (keys @ d.T).pow(2).sum() / keys.pow(2).sum()
    assert float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_repair_lowers_the_corpus_kl_and_keeps_deltas_consistent(family):
    model, tok, adapter, covs, reqs, parent, result = solved(family)
    docs = corpus(tok)
    names = list(result.deltas)
    rewrite_parent = {n: parent[n] for n in names}
    with torch.no_grad():
        kl_before = float(repair.parent_kl(model, rewrite_parent, docs, pad_id(tok)))
    config = CFG.replace(repair_steps=15, repair_lr=1e-3, repair_kl=10.0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = repair.repair(model, tok, adapter, reqs, result, covs, config, docs)
    with torch.no_grad():
        kl_after = float(repair.parent_kl(model, rewrite_parent, docs, pad_id(tok)))
    assert kl_after < kl_before, (kl_before, kl_after)
    params = dict(model.named_parameters())
    for n, p in params.items():  # only the rewrite weights moved, and the deltas say by how much
        if n in names:
            assert torch.allclose(p, parent[n] + out.deltas[n], atol=1e-6), n
            assert not torch.equal(out.deltas[n], result.deltas[n]), n
        else:
            assert torch.equal(p, parent[n]), n
    assert "repair" in out.timings and set(out.keys) == set(CFG.layers)
    assert {n: p.requires_grad for n, p in params.items()} == flags


def test_preserve_term_holds_the_earlier_edits_outputs():
    """The same repair with and without the preserve term: with it, the earlier keys' outputs move less."""
    model, tok = tiny_model()
    adapter = detect_adapter(model)
    covs = direct_cov(model, adapter, tok, CFG.layers)
    earlier = memit.edit(model, tok, adapter, parse_requests(EARLIER), covs, CFG, keep_applied=True)
    state = EditState().extended(earlier.keys)
    preserved = state.preserved(list(CFG.layers), adapter.d_ff)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    reqs = parse_requests(REQUESTS)
    docs = corpus(tok)
    moved = {}
    for mu in (0.0, 1e3):
        memit.restore(model, start)
        result = memit.edit(model, tok, adapter, reqs, covs, CFG, keep_applied=True, preserved=preserved)
        solved_w = {n: p.detach().clone() for n, p in model.named_parameters() if n in result.deltas}
        config = CFG.replace(repair_steps=10, repair_lr=3e-3, repair_kl=10.0, repair_preserve=mu)
        repair.repair(model, tok, adapter, reqs, result, covs, config, docs, preserved)
        grams = {adapter.rewrite_weight(layer): preserved[layer].float() for layer in CFG.layers}
        with torch.no_grad():
            moved[mu] = float(repair.preserved_change(dict(model.named_parameters()), solved_w, grams, adapter.conv1d))
    assert moved[1e3] < 0.5 * moved[0.0], moved


def test_with_replay_appends_the_earlier_rows_at_their_weight():
    _, tok = tiny_model()
    rows = repair.target_rows(tok, parse_requests(REQUESTS), ["{}", "x y. {}"])
    earlier = repair.target_rows(tok, parse_requests(EARLIER), ["{}"])
    both = repair.with_replay(rows, earlier, 0.5)
    assert both.ids == rows.ids + earlier.ids and both.fact_idx == rows.fact_idx + earlier.fact_idx
    assert sum(map(sum, both.weights)) == pytest.approx(1.5)


def test_replay_holds_the_earlier_facts_targets():
    """The same repair with and without rehearsing the lineage's earlier fact: with it, the earlier
    fact's target NLL on its bare prompt ends lower."""
    model, tok = tiny_model()
    adapter = detect_adapter(model)
    covs = direct_cov(model, adapter, tok, CFG.layers)
    earlier_reqs = parse_requests(EARLIER)
    memit.edit(model, tok, adapter, earlier_reqs, covs, CFG, keep_applied=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    reqs = parse_requests(REQUESTS)
    earlier_rows = repair.target_rows(tok, earlier_reqs, ["{}"])
    nll = {}
    for weight in (0.0, 10.0):
        memit.restore(model, start)
        result = memit.edit(model, tok, adapter, reqs, covs, CFG, keep_applied=True)
        config = CFG.replace(repair_steps=10, repair_lr=3e-3, repair_kl=1.0, repair_replay=weight)
        repair.repair(model, tok, adapter, reqs, result, covs, config, corpus(tok), earlier=earlier_reqs)
        with torch.no_grad():
            nll[weight] = float(repair.target_nll(model, earlier_rows, pad_id(tok), range(1)))
    assert nll[10.0] < nll[0.0], nll


def test_parent_kl_last_only_is_the_next_tokens_kl():
    """With ``last_only`` the KL is read after each sequence's last token only (the padding of the
    shorter one never counts), and it is zero at the parent's weights."""
    model, tok, _, _, _, parent, result = solved()
    rewrite_parent = {n: parent[n] for n in result.deltas}
    seqs = [[5, 6, 7], [8, 9, 10, 11, 12]]
    with torch.no_grad():
        got = float(repair.parent_kl(model, rewrite_parent, seqs, pad_id(tok), last_only=True))
        want = 0.0
        for seq in seqs:
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)
            backup = memit.set_weights(model, rewrite_parent)
            ref = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)
            memit.restore(model, backup)
            want += float((ref.exp() * (ref - logp)).sum()) / len(seqs)
        memit.restore(model, rewrite_parent)
        at_parent = float(repair.parent_kl(model, rewrite_parent, seqs, pad_id(tok), last_only=True))
    assert want > 0 and got == pytest.approx(want, rel=1e-4)
    assert at_parent == pytest.approx(0.0, abs=1e-6)


def test_anchor_holds_the_attribute_prompts_next_token():
    """The same repair with and without the anchor on the requests' attribute prompts (other
    subjects, the same relations): with it, their next token stays closer to the parent's."""
    model, tok = tiny_model()
    adapter = detect_adapter(model)
    covs = direct_cov(model, adapter, tok, CFG.layers)
    others = {"alpha {}": "gamma rho", "sigma {}": "delta", "the {}": "kappa mu"}
    reqs = [
        dataclasses.replace(r, attribute_prompts=(r.prompt.format(others[r.prompt]), r.prompt.format("lambda")))
        for r in parse_requests(REQUESTS)
    ]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = repair.anchor_prompts(tok, reqs)
    assert len(prompts) == 2 * len(reqs)
    kl = {}
    for weight in (0.0, 30.0):
        memit.restore(model, start)
        result = memit.edit(model, tok, adapter, reqs, covs, CFG, keep_applied=True)
        config = CFG.replace(repair_steps=10, repair_lr=3e-3, repair_kl=1.0, repair_anchor=weight)
        repair.repair(model, tok, adapter, reqs, result, covs, config, corpus(tok))
        with torch.no_grad():
            rewrite_start = {n: start[n] for n in result.deltas}
            kl[weight] = float(repair.parent_kl(model, rewrite_start, prompts, pad_id(tok), last_only=True))
    assert kl[30.0] < 0.5 * kl[0.0], kl


def test_config_rejects_bad_repair_settings():
    with pytest.raises(ValueError, match="repair_steps"):
        MemitConfig(repair_steps=-1)
    with pytest.raises(ValueError, match="repair_lr"):
        MemitConfig(repair_lr=0.0)
    with pytest.raises(ValueError, match="repair_replay"):
        MemitConfig(repair_replay=-1.0)
    with pytest.raises(ValueError, match="repair_anchor"):
        MemitConfig(repair_anchor=-1.0)
    assert MemitConfig().repair_steps == 0  # off by default: the published algorithm


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_only_at_keeps_values_and_is_the_outer_product_at_the_positions(family):
    """Through the hook the logits are unchanged, and the rewrite weight's gradient is δ_p k_pᵀ summed
    over the kept positions p only (δ: the gradient at the module's output, k: its input)."""
    model, tok = tiny_model(family)
    adapter = detect_adapter(model)
    module = model.get_submodule(adapter.rewrite(1))
    weight = dict(model.named_parameters())[adapter.rewrite_weight(1)]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    keep = torch.zeros(2, 4, dtype=torch.bool)
    keep[0, 1] = keep[1, 2] = True
    seen = {}
    module.register_forward_hook(lambda _m, a, out: seen.update(k=a[0], out=out) or out.retain_grad())
    plain = model(ids).logits
    plain.sum().backward()
    delta, k = seen["out"].grad, seen["k"].detach()  # (b, w, d), (b, w, d_ff)
    model.zero_grad()
    with repair.gradient_only_at([module], keep):
        hooked = model(ids).logits
    assert torch.equal(hooked, plain)
    hooked.sum().backward()
    want = sum(delta[b, p][:, None] * k[b, p][None, :] for b, p in keep.nonzero().tolist())  # (d, d_ff)
    got = weight.grad.T if adapter.conv1d else weight.grad
    assert torch.allclose(got, want, atol=1e-6)
