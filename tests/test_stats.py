"""Layer statistics: the collector's math, the token budget, corpora, the cache and the CLI.

Real tiny GPT-2 models built here, no mocks, no network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from editflow import nethook
from editflow.models import ModelHandle, detect_adapter, prepare_tokenizer
from editflow.stats import (
    CorpusSpec,
    LayerStats,
    Sampling,
    cache_keys,
    check_entry,
    collect,
    corpus_identity,
    default_max_length,
    iter_documents,
    iter_entries,
    layer_covariances,
    read_npz,
    sample_documents,
)
from editflow.stats.batching import Budget, Doc, length_batches
from editflow.stats.corpus import split_txt

WORDS = (
    "the river old village bridge castle market harbour forest valley church library museum railway garden "
    "school mountain island road tower mill lake is a in of and to north south east west city town"
).split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) for _ in range(n)]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>"))


def make_handle(seed: int = 0, n_layer: int = 4) -> ModelHandle:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=32,
        n_head=2,
        n_positions=64,
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg).eval()
    return ModelHandle(model, tok, detect_adapter(model), source="tiny-gpt2")


@pytest.fixture(scope="module")
def handle() -> ModelHandle:
    return make_handle()


@pytest.fixture()
def txt_corpus(tmp_path: Path) -> CorpusSpec:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(make_docs(200)) + "\n")
    return CorpusSpec(str(path), txt_mode="lines")


def direct_mom2(handle: ModelHandle, docs: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
    """Kᵀ K / n from each document run alone (no padding, no early stop), in float64."""
    names = [handle.adapter.rewrite(layer) for layer in layers]
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.no_grad():
        for ids in docs:
            with nethook.capture(handle.model, inputs_of=names) as store:
                handle.model(input_ids=torch.tensor([ids]))
            for n in names:
                keys[n].append(store[n][0].double())
    out = {}
    for layer, n in zip(layers, names):
        k = torch.cat(keys[n])
        out[layer] = k.T @ k / k.shape[0]
    return out


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("batch_tokens", [1, 256], ids=["one-doc-per-batch", "padded-batches"])
def test_single_pass_equals_direct_computation(handle: ModelHandle, batch_tokens: int) -> None:
    texts = make_docs(30, seed=1)
    layers = [0, 2, 3]
    stopped_at: list[str] = []
    hook = handle.model.transformer.ln_f.register_forward_hook(lambda *a: stopped_at.append("ln_f"))
    try:
        stats, budget = collect(
            handle.model,
            handle.tokenizer,
            handle.adapter,
            layers,
            texts,
            tokens=10**9,
            max_length=64,
            dtype=torch.float64,
            batch_tokens=batch_tokens,
            progress=False,
        )
    finally:
        hook.remove()
    assert stopped_at == [], "the pass must stop at the deepest rewrite module"
    docs = [list(handle.tokenizer(t)["input_ids"]) for t in texts]
    expected = direct_mom2(handle, docs, layers)
    assert budget.exhausted and budget.docs_end == len(texts)
    for layer in layers:
        assert stats[layer].count == sum(map(len, docs))
        torch.testing.assert_close(stats[layer].mom2(), expected[layer], rtol=1e-5, atol=1e-6)


def test_merge_equals_one_pass() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(70, 8, generator=g)
    one = LayerStats.zeros(8, torch.float64)
    one.add(torch.cat([a, b]))
    first, second = LayerStats.zeros(8, torch.float64), LayerStats.zeros(8, torch.float64)
    first.add(a)
    second.add(b)
    merged = first.merge(second)
    assert merged.count == 120
    torch.testing.assert_close(merged.mom2(), one.mom2())
    torch.testing.assert_close(merged.mean(), one.mean())


@pytest.mark.parametrize("dim,block", [(50, 16), (48, 16), (2100, 1024)])
def test_block_upper_triangle_update_equals_full_product(dim: int, block: int) -> None:
    from editflow.stats.moments import add_upper, mirror_upper

    x = torch.randn(40, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64)
    acc = torch.zeros(dim, dim, dtype=torch.float64)
    add_upper(acc, x[:25], block)
    mirror_upper(acc, block)
    add_upper(acc, x[25:], block)  # lower blocks are stale again until mirrored
    mirror_upper(acc, block)
    torch.testing.assert_close(acc, x.T @ x)
    stats = LayerStats.zeros(dim, torch.float64)
    stats.add(x)
    torch.testing.assert_close(stats.mom2(), x.T @ x / 40)


def test_budget_takes_a_prefix_of_the_stream() -> None:
    docs = [Doc(i, tuple(range(n))) for i, n in enumerate([5, 0, 7, 3, 9, 4])]
    small, large = Budget(10), Budget(20)
    assert [d.index for d in small.take(docs)] == [0, 2]
    assert [d.index for d in large.take(docs)] == [0, 2, 3, 4]
    assert (small.taken, small.docs_end, large.taken, large.docs_end) == (12, 3, 24, 5)
    batches = list(length_batches(docs, batch_tokens=16))
    assert sorted(d.index for b in batches for d in b) == [0, 1, 2, 3, 4, 5]
    assert all(len(b) * len(b[0].ids) <= 16 or len(b) == 1 for b in batches)


def test_extending_a_cached_estimate_equals_one_pass(txt_corpus: CorpusSpec, tmp_path: Path) -> None:
    handle = make_handle()
    handle.model.double()  # float64 forward: batch composition then changes nothing beyond 1e-12
    kw = dict(dtype="float64", progress=False, batch_tokens=128)
    small = layer_covariances(handle, [1, 2], txt_corpus, 600, cache_dir=tmp_path / "a", **kw)
    extended = layer_covariances(handle, [1, 2], txt_corpus, 1500, cache_dir=tmp_path / "a", **kw)
    fresh = layer_covariances(handle, [1, 2], txt_corpus, 1500, cache_dir=tmp_path / "b", **kw)
    assert [e.manifest["source"] for e in extended.entries] == ["extended", "extended"]
    assert extended.entries[0].manifest["extended_from"] == small.entries[0].key
    for layer in (1, 2):
        assert extended.stats[layer].count == fresh.stats[layer].count >= 1500
        assert extended.stats[layer].docs == fresh.stats[layer].docs
        torch.testing.assert_close(extended.covs[layer], fresh.covs[layer], rtol=1e-10, atol=1e-12)
        assert extended.entries[0].key == fresh.entries[0].key


def test_reuse_and_only_missing_layers_computed(handle: ModelHandle, txt_corpus: CorpusSpec, tmp_path: Path) -> None:
    first = layer_covariances(handle, [1, 3], txt_corpus, 500, cache_dir=tmp_path, progress=False)
    second = layer_covariances(handle, [1, 2, 3], txt_corpus, 500, cache_dir=tmp_path, progress=False)
    assert [e.hit for e in first.entries] == [False, False]
    assert [e.hit for e in second.entries] == [True, False, True]
    assert second.covs[1].dtype == torch.float32 and second.covs[1].shape == (128, 128)
    torch.testing.assert_close(second.covs[1], first.covs[1])
    for entry in second.entries:
        with np.load(entry.path) as data:
            assert {"sum", "sum_k", "count", "mom2"} <= set(data.files)
        assert entry.manifest_path.exists() and entry.manifest["fields"]["module"].endswith("mlp.c_proj")


# ----------------------------------------------------------------------------- the key


def test_every_key_part_changes_the_entry(handle: ModelHandle, txt_corpus: CorpusSpec, tmp_path: Path) -> None:
    def key(
        h: ModelHandle = handle,
        corpus: CorpusSpec = txt_corpus,
        tokens: int = 500,
        dtype: str = "float32",
        max_length: int = 64,
        seed: int = 0,
        layer: int = 1,
    ) -> str:
        return cache_keys(h, [layer], corpus, tokens, max_length, dtype, Sampling(seed=seed))[layer].digest()

    base = key()
    assert key() == base
    changed = make_handle()
    with torch.no_grad():
        changed.model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    assert key(changed) != base
    other = tmp_path / "other.txt"
    other.write_text(Path(txt_corpus.source).read_text() + "one more line\n")
    assert key(corpus=CorpusSpec(str(other), txt_mode="lines")) != base
    assert key(corpus=CorpusSpec(txt_corpus.source, txt_mode="blocks")) != base
    assert len({base, key(tokens=501), key(dtype="float64"), key(max_length=32), key(seed=1)}) == 5
    # Weights after the layer (and its own rewrite weight, which MEMIT edits) do not affect its keys.
    later = make_handle()
    with torch.no_grad():
        later.model.transformer.h[3].mlp.c_fc.weight[0, 0] += 1.0
        later.model.transformer.h[1].mlp.c_proj.weight[0, 0] += 1.0
    assert key(later) == base and key(later, layer=3) != key(layer=3)


def test_changed_corpus_file_gives_a_new_entry(handle: ModelHandle, tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("\n".join(make_docs(40)))
    spec = CorpusSpec(str(path), txt_mode="lines")
    a = layer_covariances(handle, [1], spec, 300, cache_dir=tmp_path / "cache", progress=False)
    path.write_text("\n".join(make_docs(40, seed=5)))
    b = layer_covariances(handle, [1], spec, 300, cache_dir=tmp_path / "cache", progress=False)
    assert not b.entries[0].hit and a.entries[0].path != b.entries[0].path
    assert len(list(iter_entries(tmp_path / "cache"))) == 2


# ----------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "manifest-key"])
def test_damaged_entry_is_reported_and_recomputed(
    handle: ModelHandle, txt_corpus: CorpusSpec, tmp_path: Path, damage: str
) -> None:
    first = layer_covariances(handle, [2], txt_corpus, 400, cache_dir=tmp_path, progress=False)
    path = first.entries[0].path
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "flip-byte":
        data = bytearray(path.read_bytes())
        data[-200] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        manifest = json.loads(path.with_suffix(".json").read_text())
        manifest["fields"]["tokens"] = 10
        path.with_suffix(".json").write_text(json.dumps(manifest))
    assert check_entry(path)[0]
    with pytest.warns(RuntimeWarning, match="invalid statistics cache entry"):
        again = layer_covariances(handle, [2], txt_corpus, 400, cache_dir=tmp_path, progress=False)
    assert not again.entries[0].hit and check_entry(path)[0] == []
    torch.testing.assert_close(again.covs[2], first.covs[2])


WORKER = textwrap.dedent("""
    import sys
    from editflow.models import load_model
    from editflow.stats import CorpusSpec, layer_covariances
    handle = load_model(sys.argv[1], device="cpu")
    res = layer_covariances(handle, [1, 2], CorpusSpec(sys.argv[2], txt_mode="lines"), 3000,
                            cache_dir=sys.argv[3], progress=False)
    print("HIT" if res.entries[0].hit else "COMPUTED", float(res.covs[1].sum()))
""")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    h = make_handle()
    h.model.save_pretrained(path)
    h.tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_two_processes_leave_one_valid_file(model_dir: Path, txt_corpus: CorpusSpec, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", WORKER, str(model_dir), txt_corpus.source, str(tmp_path / "cache")]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = sorted(o[0].split()[0] for o in outs)
    assert lines == ["COMPUTED", "HIT"]
    assert len({o[0].split()[1] for o in outs}) == 1
    entries = list(iter_entries(tmp_path / "cache"))
    assert len(entries) == 2 and all(check_entry(p)[0] == [] for p in entries)
    leftovers = [p for p in (tmp_path / "cache").rglob("*.tmp")]
    assert leftovers == []


# ----------------------------------------------------------------------------- corpora


def test_local_parquet_directory_like_wikipedia(handle: ModelHandle, tmp_path: Path) -> None:
    import pandas as pd

    root = tmp_path / "wikipedia" / "20231101.en"
    root.mkdir(parents=True)
    docs = make_docs(60, seed=3)
    for i in range(2):
        part = docs[i * 30 : (i + 1) * 30]
        pd.DataFrame({"id": range(len(part)), "title": ["t"] * len(part), "text": part}).to_parquet(
            root / f"train-0000{i}-of-00002.parquet"
        )
    spec = CorpusSpec(str(tmp_path / "wikipedia"))
    assert spec.resolved().kind == "dir"
    assert list(iter_documents(spec)) == docs
    ident = corpus_identity(spec)
    assert [f[0] for f in ident["files"]] == [
        "20231101.en/train-00000-of-00002.parquet",
        "20231101.en/train-00001-of-00002.parquet",
    ]
    result = layer_covariances(handle, [0, 1], spec, 400, cache_dir=tmp_path / "cache", progress=False)
    assert result.stats[0].count >= 400
    single = CorpusSpec(str(root / "train-00000-of-00002.parquet"))
    assert list(iter_documents(single)) == docs[:30]
    hf = CorpusSpec("parquet", data_files=(str(root / "train-00000-of-00002.parquet"),))
    assert list(iter_documents(hf)) == docs[:30]
    assert corpus_identity(hf)["files"][0][1] == corpus_identity(single)["files"][0][1]


def test_txt_and_jsonl_files(handle: ModelHandle, tmp_path: Path) -> None:
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc line one\nline two\n\n\nsecond doc\n\nthird\n")
    assert list(iter_documents(CorpusSpec(str(txt)))) == ["first doc line one\nline two", "second doc", "third"]
    assert len(list(iter_documents(CorpusSpec(str(txt), txt_mode="lines")))) == 4
    assert list(split_txt("a\n\nb", "blocks")) == ["a", "b"]
    assert list(split_txt("a\nb\n\nc\n", "blocks")) == ["a\nb", "c"]
    assert list(split_txt("a\nb\nc\n", "blocks")) == ["a", "b", "c"]  # no blank line: one per line
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d}) for d in make_docs(20)))
    spec = CorpusSpec(str(jsonl), text_field="body")
    assert list(iter_documents(spec)) == make_docs(20)
    result = layer_covariances(handle, [3], spec, 100, cache_dir=tmp_path / "cache", progress=False)
    assert result.stats[3].count >= 100
    with pytest.raises(KeyError, match="no field 'text'"):
        list(iter_documents(CorpusSpec(str(jsonl))))


def test_sampling_is_seeded(txt_corpus: CorpusSpec) -> None:
    a = list(sample_documents(txt_corpus, Sampling(seed=0, shuffle_buffer=50)))
    assert a == list(sample_documents(txt_corpus, Sampling(seed=0, shuffle_buffer=50)))
    assert a != list(sample_documents(txt_corpus, Sampling(seed=1, shuffle_buffer=50)))
    assert sorted(a) == sorted(iter_documents(txt_corpus))


def test_default_max_length_is_capped() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=131072,
    )
    assert default_max_length(LlamaForCausalLM(cfg)) == 1024
    assert default_max_length(make_handle(n_layer=1).model) == 64


# ----------------------------------------------------------------------------- CLI


def test_cli_compute_list_verify_export_import(model_dir: Path, txt_corpus: CorpusSpec, tmp_path: Path) -> None:
    from editflow.cli import main

    runner = CliRunner()
    cache = str(tmp_path / "cache")

    def run(*args: str, code: int = 0):
        result = runner.invoke(main, ["stats", *args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    out = run(
        "compute",
        str(model_dir),
        "--layers",
        "1-2",
        "--corpus",
        txt_corpus.source,
        "--txt-mode",
        "lines",
        "--tokens",
        "300",
        "--cache-dir",
        cache,
        "--no-progress",
    )
    assert out.count("computed") == 2
    out = run(
        "compute",
        str(model_dir),
        "--layers",
        "1,2",
        "--corpus",
        txt_corpus.source,
        "--txt-mode",
        "lines",
        "--tokens",
        "300",
        "--cache-dir",
        cache,
        "--no-progress",
    )
    assert out.count("cached") == 2
    assert "2 entries" in run("list", "--cache-dir", cache)
    assert "2 ok, 0 bad" in run("verify", "--cache-dir", cache)

    key = sorted(iter_entries(Path(cache)))[0].stem
    run("export", key[:10], str(tmp_path / "out"), "--cache-dir", cache)
    run("export", key, str(tmp_path / "memit"), "--format", "memit", "--cache-dir", cache)
    stats, fmt = read_npz(tmp_path / "memit" / f"{key}.npz")
    assert fmt == "memit" and stats.count >= 300

    # A MEMIT-layout file (raw Σ k kᵀ in mom2.mom2) imported for layer 3 under a key compute would build.
    g = torch.Generator().manual_seed(0)
    k = torch.randn(500, 128, generator=g)
    memit_file = tmp_path / "transformer.h.3.mlp.c_proj_float32_mom2_500.npz"
    np.savez(memit_file, **{"mom2.mom2": (k.T @ k).numpy(), "mom2.count": np.asarray(500)})
    out = run(
        "import",
        str(memit_file),
        "--model",
        str(model_dir),
        "--layer",
        "3",
        "--corpus",
        txt_corpus.source,
        "--txt-mode",
        "lines",
        "--cache-dir",
        cache,
    )
    assert "memit layout" in out
    manifests = [json.loads(p.with_suffix(".json").read_text()) for p in iter_entries(Path(cache))]
    imported = [m for m in manifests if m["source"] == "imported"]
    assert len(imported) == 1 and imported[0]["fields"]["layer"] == 3 and imported[0]["tokens"] == 500

    from editflow.models import load_model

    h = load_model(str(model_dir), device="cpu")
    reused = layer_covariances(
        h, [3], CorpusSpec(txt_corpus.source, txt_mode="lines"), 500, cache_dir=cache, progress=False
    )
    assert reused.entries[0].hit
    torch.testing.assert_close(reused.covs[3], k.T @ k / 500)

    victim = sorted(iter_entries(Path(cache)))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    out = run("verify", "--cache-dir", cache, code=1)
    assert "1 bad" in out and "checksum mismatch" in out


# ----------------------------------------------------------------------------- sanity of covariances


def _psd(dim: int = 16, n: int = 8, seed: int = 0) -> torch.Tensor:
    k = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return k.T @ k / n  # rank-deficient when n < dim: still PSD


@pytest.mark.parametrize(
    "name, matrix, problem",
    [
        (
            "nan",
            lambda: _psd().index_put_((torch.tensor([0]), torch.tensor([1])), torch.tensor(float("nan"))),
            "not finite",
        ),
        ("inf", lambda: _psd() + torch.diag(torch.full((16,), float("inf"))), "not finite"),
        ("asymmetric", lambda: _psd() + torch.triu(torch.ones(16, 16), 1), "not symmetric"),
        ("negative", lambda: -_psd(n=64), "not positive semi-definite"),
        (
            "indefinite",
            lambda: _psd(n=64) - 2 * torch.diag(torch.eye(16)[0] * _psd(n=64).diagonal().max() * 10),
            "not positive semi-definite",
        ),
        ("not-square", lambda: torch.ones(3, 4), "not a square matrix"),
    ],
)
def test_bad_covariances_are_named(name: str, matrix, problem: str) -> None:
    from editflow.stats.sanity import CovarianceError, check_covariance, covariance_problems

    problems = covariance_problems(matrix())
    assert len(problems) == 1 and problem in problems[0]
    with pytest.raises(CovarianceError, match=f"layer 7 statistics.*{problem}"):
        check_covariance(matrix(), 7)


def test_good_covariances_pass() -> None:
    from editflow.stats.sanity import covariance_problems

    assert covariance_problems(_psd()) == []  # rank 8 of 16, float32 rounding
    assert covariance_problems(_psd(dim=300, n=40, seed=2)) == []
    assert covariance_problems(torch.zeros(4, 4)) == []
    assert covariance_problems(_psd(n=64).double()) == []


def _tamper(npz: Path, stats: LayerStats) -> None:
    """Replace an entry's statistics and re-vouch for them in its manifest (valid checksum, bad content)."""
    from editflow.hashing import file_sha256
    from editflow.stats import write_npz

    write_npz(npz, stats)
    manifest = json.loads(npz.with_suffix(".json").read_text())
    manifest.update(npz_sha256=file_sha256(npz), npz_bytes=npz.stat().st_size, tokens=stats.count)
    npz.with_suffix(".json").write_text(json.dumps(manifest))


def test_compute_refuses_a_non_finite_covariance_before_writing(txt_corpus: CorpusSpec, tmp_path: Path) -> None:
    from editflow.stats.sanity import CovarianceError

    h = make_handle(seed=1)
    with torch.no_grad():
        h.model.transformer.h[1].ln_2.weight[0] = float("nan")
    with pytest.raises(CovarianceError, match="layer 1 statistics.*not finite"):
        layer_covariances(h, [0, 1], txt_corpus, 200, cache_dir=tmp_path, progress=False)
    assert list(iter_entries(tmp_path)) == []


def test_verify_and_use_refuse_an_intact_but_unusable_entry(
    handle: ModelHandle, txt_corpus: CorpusSpec, tmp_path: Path
) -> None:
    from editflow.cli import main
    from editflow.stats.sanity import CovarianceError

    first = layer_covariances(handle, [2], txt_corpus, 300, cache_dir=tmp_path, progress=False)
    npz = first.entries[0].path
    good = first.stats[2]
    _tamper(npz, LayerStats(-good.sum_kkT, good.sum_k, good.count, good.docs))
    assert check_entry(npz, sanity=False)[0] == []
    problems, _ = check_entry(npz)
    assert len(problems) == 1 and "layer 2 covariance is not positive semi-definite" in problems[0]
    result = CliRunner().invoke(main, ["stats", "verify", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1 and "0 ok, 1 bad" in result.output and "positive semi-definite" in result.output
    with pytest.raises(CovarianceError, match="layer 2 statistics .*cache entry.*not positive semi-definite"):
        layer_covariances(handle, [2], txt_corpus, 300, cache_dir=tmp_path, progress=False)


def _cli(*args: str):
    from editflow.cli import main

    result = CliRunner().invoke(main, ["stats", *args])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return result, lines


@pytest.mark.parametrize(
    "name, arrays, message",
    [
        (
            "nan",
            lambda k: {"mom2.mom2": np.full((128, 128), np.nan, np.float32), "mom2.count": np.asarray(5)},
            "not finite",
        ),
        (
            "asym",
            lambda k: {
                "mom2.mom2": (k.T @ k + np.triu(np.ones((128, 128)), 1)).astype(np.float32),
                "mom2.count": np.asarray(500),
            },
            "not symmetric",
        ),
        ("not-psd", lambda k: {"mom2.mom2": -(k.T @ k), "mom2.count": np.asarray(500)}, "not positive semi-definite"),
        (
            "pickled",
            lambda k: {"mom2.mom2": np.array([{"a": 1}], dtype=object), "mom2.count": np.asarray(5)},
            "pickled Python objects",
        ),
        ("strings", lambda k: {"sum": np.array(["a"]), "count": np.asarray(5)}, "not a number"),
        ("no-arrays", lambda k: {"other": np.zeros(3)}, "not a statistics file"),
    ],
)
def test_import_refuses_bad_files(model_dir: Path, tmp_path: Path, name: str, arrays, message: str) -> None:
    k = np.random.default_rng(0).standard_normal((500, 128)).astype(np.float32)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays(k))
    cache = tmp_path / "cache"
    result, lines = _cli("import", str(path), "--model", str(model_dir), "--layer", "3", "--cache-dir", str(cache))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    if name in ("nan", "asym", "not-psd"):
        assert "layer 3" in lines[0]
    assert list(iter_entries(cache)) == []


def test_import_refuses_a_pickle_file(model_dir: Path, tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "stats.npz"
    path.write_bytes(pickle.dumps({"mom2.mom2": [[1.0]]}))
    result, lines = _cli(
        "import", str(path), "--model", str(model_dir), "--layer", "3", "--cache-dir", str(tmp_path / "cache")
    )
    assert result.exit_code == 1 and len(lines) == 1 and "never does" in lines[0]


def test_unwritable_cache_is_a_clear_error(
    handle: ModelHandle, model_dir: Path, txt_corpus: CorpusSpec, tmp_path: Path
) -> None:
    from editflow.stats.cache import CacheError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="is not writable"):
        layer_covariances(handle, [1], txt_corpus, 100, cache_dir=blocker / "cache", progress=False)
    result, lines = _cli(
        "compute",
        str(model_dir),
        "--layers",
        "1",
        "--corpus",
        txt_corpus.source,
        "--txt-mode",
        "lines",
        "--tokens",
        "100",
        "--cache-dir",
        str(blocker / "cache"),
        "--no-progress",
    )
    assert result.exit_code == 1 and len(lines) == 1 and "not writable" in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_cache_directory(handle: ModelHandle, txt_corpus: CorpusSpec, tmp_path: Path) -> None:
    from editflow.stats.cache import CacheError

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CacheError, match="is not writable"):
            layer_covariances(handle, [1], txt_corpus, 100, cache_dir=ro, progress=False)
    finally:
        ro.chmod(0o755)
