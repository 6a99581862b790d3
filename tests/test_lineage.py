"""Lineage state and the cumulative gate: pure pieces (edit state, fact bookkeeping, gate rules)."""

from __future__ import annotations

import pytest
import torch

from editflow.edit_state import EditState, EditStateError, LayerKeys, load_state, save_state
from editflow.registry import lineage
from editflow.registry.promotion import GateThresholds, gate
from editflow.requests import EditRequest


def keys(n: int, d_ff: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d_ff, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_factor_form_is_exact_and_switches_to_the_sum_past_d_ff():
    d_ff = 12
    a, b, c = keys(5, d_ff, 0), keys(6, d_ff, 1), keys(4, d_ff, 2)
    state = EditState().extended({3: a}).extended({3: b})
    assert state.layers[3].factor is not None and state.layers[3].factor.shape == (d_ff, 11)
    expected = a.T @ a + b.T @ b
    assert torch.allclose(state.preserved([3], d_ff)[3], expected, rtol=0, atol=1e-12)
    state = state.extended({3: c})  # 15 keys > d_ff: the d_ff × d_ff sum from here on
    assert state.layers[3].gram_sum is not None and state.layers[3].n_keys == 15
    assert torch.allclose(state.preserved([3], d_ff)[3], expected + c.T @ c, rtol=0, atol=1e-12)
    assert torch.equal(state.preserved([4], d_ff)[4], torch.zeros(d_ff, d_ff, dtype=torch.float64))


@pytest.mark.parametrize("dtype, tol", [("float64", 0.0), ("float32", 1e-6)])
def test_state_round_trips_and_reports_its_compact_error(tmp_path, dtype, tol):
    d_ff = 16
    state = EditState().extended({0: keys(3, d_ff, 0), 2: keys(20, d_ff, 1)})
    record = save_state(state, tmp_path, dtype=dtype)
    back = load_state(tmp_path, record)
    assert record["n_keys"] == 20 and record["layers"] == [0, 2]
    for layer in (0, 2):
        want, got = state.preserved([layer], d_ff)[layer], back.preserved([layer], d_ff)[layer]
        rel = float((got - want).norm() / want.norm())
        assert rel <= tol, rel
    assert back.layers[0].n_keys == 3


def test_corrupt_or_missing_state_is_refused(tmp_path):
    record = save_state(EditState().extended({1: keys(2, 8, 0)}), tmp_path)
    path = tmp_path / record["file"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EditStateError, match="corrupt"):
        load_state(tmp_path, record)
    path.unlink()
    with pytest.raises(EditStateError, match="missing"):
        load_state(tmp_path, record)
    assert load_state(tmp_path, None).layers == {}


def req(subject: str, target: str, prompt: str = "{} plays") -> EditRequest:
    return EditRequest(prompt=prompt, subject=subject, target_new=target, target_true="x")


def test_earlier_facts_leave_out_what_the_batch_overwrites_and_sample_past_the_cap():
    held = [req("a", "1"), req("b", "2"), req("c", "3")]
    earlier, total = lineage.earlier_facts(held, [req("b", "9")])
    assert [r.subject for r in earlier] == ["a", "c"] and total == 2
    many = [req(f"s{i}", "t") for i in range(50)]
    sample, total = lineage.earlier_facts(many, [], cap=10, seed=3)
    again, _ = lineage.earlier_facts(many, [], cap=10, seed=3)
    assert total == 50 and len(sample) == 10 and sample == again


def test_root_references_start_at_the_root_and_are_carried():
    pre = {"pre/drift_ppl": 5.0, "pre/heldout": 100.0}
    root = lineage.root_references({"editflow.role": "base"}, {}, pre)
    assert root == {"drift_ppl": 5.0, "heldout": 100.0, "drift_slice": 2.0}
    later = {"pre/drift_ppl": 7.0, "pre/heldout": 80.0}
    edit_tags = {"editflow.role": "edit"}
    assert lineage.root_references(edit_tags, {"root_references": root}, later) == root
    # a root perplexity measured on all held-out text (before drift_texts) is not compared
    older = {"drift_ppl": 5.0, "heldout": 100.0}
    assert lineage.root_references(edit_tags, {"root_references": older}, later) == {"heldout": 100.0}
    legacy = {**edit_tags, "editflow.root.drift_ppl": "5", "editflow.root.heldout": "100"}
    assert lineage.root_references(legacy, {}, later) == {"heldout": 100.0}


def test_cumulative_gate_refuses_drift_that_passed_step_by_step():
    # Each step: +8 % perplexity against its parent (passes the 10 % rule); 1.08³ ≈ +26 % against the root.
    metrics = {
        "pre/drift_ppl": 5.0 * 1.08**2,
        "post/drift_ppl": 5.0 * 1.08**3,
        "post/drift_ppl_rel": 0.08,
        "post/efficacy": 100.0,
        "post/retention": 95.0,
    }
    assert gate(metrics, GateThresholds()).passed  # the parent-only gate lets it through
    verdict = gate(metrics, GateThresholds(), root={"drift_ppl": 5.0})
    assert not verdict.passed and "above the root base's" in verdict.reasons[0]


def test_cumulative_gate_names_each_failing_rule():
    metrics = {"post/retention": 70.0, "post/heldout": 60.0, "post/drift_ppl": 5.0}
    reasons = gate(metrics, GateThresholds(), root={"drift_ppl": 5.0, "heldout": 100.0}).reasons
    assert any(r.startswith("retention of earlier facts 70.0") for r in reasons)
    assert any(r.startswith("heldout 40.0 points below the root") for r in reasons)
    assert len(reasons) == 2


def test_layer_keys_empty_gram_is_zero():
    assert torch.equal(LayerKeys().gram(3), torch.zeros(3, 3, dtype=torch.float64))
