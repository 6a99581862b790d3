"""Progress on stderr: whole lines where stderr is not a terminal, nothing with --quiet, and the
short-corpus notice said before the statistics pass."""

from __future__ import annotations

import pytest

from editflow import progress


@pytest.fixture(autouse=True)
def _loud():
    progress.set_quiet(False)
    yield
    progress.set_quiet(None)  # back to the environment's choice


def test_bar_writes_whole_lines_when_stderr_is_not_a_terminal(capsys):
    with progress.bar(total=3, desc="work", unit="step", mininterval=0) as bar:
        for _ in range(3):
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("work:") for line in lines) and "3/3" in lines[-1]


def test_quiet_silences_bars_and_notes(capsys):
    progress.set_quiet(True)
    for _ in progress.track(range(5), desc="quiet"):
        pass
    progress.note("nothing")
    assert capsys.readouterr().err == ""


def test_short_corpus_is_said_before_the_pass(tmp_path, capsys):
    from conftest import tiny_model

    from editflow.models import ModelHandle, detect_adapter
    from editflow.stats import CorpusSpec, layer_covariances

    model, tok = tiny_model("gpt2")
    handle = ModelHandle(model=model, tokenizer=tok, adapter=detect_adapter(model), source="tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join("alpha beta gamma delta" for _ in range(10)))  # 40 tokens
    layer_covariances(handle, [1], CorpusSpec(source=str(corpus)), 1000, cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    notice = err.index("holds 40 tokens for this tokenizer, fewer than the budget of 1,000")
    assert notice < err.index("layer stats")  # said before the pass's own progress
