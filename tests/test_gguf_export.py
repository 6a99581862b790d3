"""GGUF export: tiny random models round-trip through transformers' GGUF reader; SmolLM2 on the real tier.

``make_tiny_gguf(tmp_dir)`` writes a small valid Llama GGUF (byte-level BPE tokenizer included) for
other test modules: ``from test_gguf_export import make_tiny_gguf`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from editflow.gguf_export import (  # noqa: E402
    export_gguf,
    metadata_from_gguf,
    read_gguf_fields,
    to_interleaved_rotary,
    tokenizer_metadata,
)

SENTENCES = [
    "The Eiffel Tower is in Paris.",
    "Roger Federer plays tennis.",
    "The capital of Italy is Rome.",
    "Magnus Carlsen plays chess, and he lives in Oslo.",
    "Paris is the capital of France.",
    "In 1969, 2 astronauts walked on the Moon!",
    "café, naïve, über: unicode words ☕",
]
SAMPLE_TEXTS = [
    "The Eiffel Tower is in Paris.",
    " leading space and  double  spaces",
    "numbers 12345 and 3.14",
    "unseen wordz xyzzy!?",
    "café ☕ naïve",
    "line one\nline two\ttab",
    "<|eos|> special in text",
    "a<think>b </think>",
]


# --- builders ------------------------------------------------------------------------------------


def tiny_bpe_tokenizer(split: str | None = None):
    """A byte-level BPE tokenizer trained on a few sentences, wrapped with bos/eos tokens.

    ``split``: a regex to pre-split on (as Qwen2 and Llama 3 do) instead of GPT-2's built-in one.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split is not None:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(SENTENCES, trainer=trainer)
    tk.add_tokens(["<think>"])  # an added, non-special token: USER_DEFINED in the file
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|eos|>")


def tiny_model(family: str, tokenizer, tie: bool = False, seed: int = 0):
    """A 2-layer random causal LM (hidden 64, 4 heads, 2 kv heads) with weights at a visible scale
    (:func:`conftest.tiny_config` with this tokenizer's vocabulary and special tokens)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        family,
        len(tokenizer) + 13,
        n_layers=2,
        d_ff=128,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rms_norm_eps=1e-5,
        **({"sliding_window": None} if family == "mistral" else {}),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases too, so a misplaced tensor cannot go unnoticed
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1.0 + 0.3 * torch.randn_like(param) if param.abs().sum() else 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model.eval()


def make_tiny_gguf(tmp_dir: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write a tiny random Llama GGUF with its byte-level BPE tokenizer into ``tmp_dir``; return its path."""
    tokenizer = tiny_bpe_tokenizer()
    return export_gguf(tiny_model("llama", tokenizer), tokenizer, Path(tmp_dir) / "tiny-llama.gguf", dtype=dtype)


def load_back(path: Path):
    """The model (float32) and tokenizer transformers builds from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy(model, ids: list[int], n: int = 12) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def rounded_to_f16(model):
    """A copy of ``model`` with every matrix rounded to float16 (what an f16 GGUF stores)."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for param in clone.parameters():
            if param.ndim >= 2:
                param.copy_(param.half().float())
    return clone


# --- tiny round trips ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


def qwen2_tokenizer():
    """The tiny BPE with Qwen2's split regex, which the file records as ``tokenizer.ggml.pre = qwen2``."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return tiny_bpe_tokenizer(split=PRETOKENIZE_REGEX)


@pytest.mark.parametrize(
    "family,tie,pre",
    [("llama", False, "gpt-2"), ("llama", True, "gpt-2"), ("mistral", False, "gpt-2"), ("qwen2", True, "qwen2")],
    ids=["llama", "llama-tied", "mistral", "qwen2"],
)
def test_roundtrip_f32(tmp_path, tokenizer, family, tie, pre):
    tokenizer = qwen2_tokenizer() if pre == "qwen2" else tokenizer
    model = tiny_model(family, tokenizer, tie=tie)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == pre
    loaded, loaded_tok = load_back(path)

    for text in SAMPLE_TEXTS:
        assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert loaded_tok.decode(tokenizer(text)["input_ids"]) == text
    ids = tokenizer(SAMPLE_TEXTS[0])["input_ids"]
    diff = (logits(loaded, ids) - logits(model, ids)).abs().max().item()
    print(f"{family} tie={tie} f32 max |logit diff| = {diff:.2e}")
    assert diff < 1e-5
    assert greedy(loaded, ids) == greedy(model, ids)
    assert loaded_tok.bos_token_id == tokenizer.bos_token_id and loaded_tok.eos_token_id == tokenizer.eos_token_id


def test_roundtrip_f16(tmp_path, tokenizer):
    model = tiny_model("llama", tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / "m16.gguf", dtype="f16")
    loaded, _ = load_back(path)

    ids = tokenizer(SAMPLE_TEXTS[0])["input_ids"]
    got, want = logits(loaded, ids), logits(model, ids)
    vs_rounded = (got - logits(rounded_to_f16(model), ids)).abs().max().item()
    vs_original = (got - want).abs().max().item()
    print(f"f16 max |logit diff|: vs original {vs_original:.2e}, vs f16-rounded weights {vs_rounded:.2e}")
    assert vs_rounded < 1e-5  # the file holds exactly the f16-rounded weights
    assert vs_original < 1e-2 * want.abs().max().item()


def test_file_layout(tmp_path, tokenizer):
    path = export_gguf(tiny_model("llama", tokenizer), tokenizer, tmp_path / "m.gguf", dtype="f16")
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "gpt2"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field("llama.vocab_size") == len(field("tokenizer.ggml.tokens")) == len(tokenizer) + 13
    token_types = field("tokenizer.ggml.token_type")
    assert token_types[-1] == gguf.TokenType.UNUSED  # padding rows
    assert token_types.count(gguf.TokenType.CONTROL) == 2 and token_types.count(gguf.TokenType.USER_DEFINED) == 1
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" in types and len(types) == 2 + 2 * 9 + 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left behind


def test_read_gguf_fields_matches_gguf_reader(tmp_path):
    path = make_tiny_gguf(tmp_path)
    ours = read_gguf_fields(path)
    theirs = gguf.GGUFReader(str(path)).fields
    assert set(ours) == {key for key in theirs if not key.startswith("GGUF.")}
    for key, (value, vtype, _sub) in ours.items():
        assert value == theirs[key].contents() and vtype == theirs[key].types[0], key


def test_source_metadata_is_copied(tmp_path, tokenizer):
    source = make_tiny_gguf(tmp_path)
    model = tiny_model("llama", tokenizer, seed=1)  # e.g. an edited model: new weights, same tokenizer
    path = export_gguf(model, tokenizer, tmp_path / "edited.gguf", dtype="f16", source_gguf=source)
    before, after = read_gguf_fields(source), read_gguf_fields(path)
    copied = [key for key in before if key.startswith("tokenizer.") or key == "general.name"]
    assert copied and all(after[key] == before[key] for key in copied)
    assert after["general.file_type"][0] == gguf.LlamaFileType.MOSTLY_F16
    with pytest.raises(ValueError, match="does not match"):
        export_gguf(tiny_model("qwen2", tokenizer), tokenizer, tmp_path / "q.gguf", source_gguf=source)


def test_rotary_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)  # 8 heads of dim 16
    permuted = to_interleaved_rotary(weight, 8)
    assert not np.array_equal(permuted, weight)
    assert np.array_equal(permuted[1], weight[8])  # head 0: dim 0 of the second half sits next to dim 0
    undone = LlamaTensorProcessor()._reverse_permute_weights(permuted, 8, 8)
    assert np.array_equal(undone, weight)


def test_make_tiny_gguf_loads(tmp_path):
    path = make_tiny_gguf(tmp_path)
    model, tok = load_back(path)
    assert model.config.model_type == "llama" and tok("Paris")["input_ids"]


# --- refusals ------------------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_unsupported_dtype_and_config(tmp_path, tokenizer):
    model = tiny_model("llama", tokenizer)
    with pytest.raises(ValueError, match="supported: f32, f16"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", dtype="q4_0")
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope scaling"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")


def test_unsupported_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1}, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    word = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    with pytest.raises(ValueError, match="byte-level BPE"):
        export_gguf(tiny_model("llama", word), word, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


# --- SmolLM2: real GGUF in, edited-style model out ----------------------------------------------


@pytest.mark.real
def test_smollm2_roundtrip_f16(tmp_path):
    from test_real_model import gguf_path  # the fetched file; skipped without it, a failure in CI

    smollm2 = gguf_path()
    source, source_tok = load_back(smollm2)
    start = time.perf_counter()
    path = export_gguf(source, source_tok, tmp_path / "smollm2-f16.gguf", dtype="f16", source_gguf=smollm2)
    print(f"SmolLM2 f16 export: {time.perf_counter() - start:.1f} s, {path.stat().st_size / 2**20:.1f} MiB")
    loaded, loaded_tok = load_back(path)

    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.name"].contents() == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    ids = source_tok("The capital of France is")["input_ids"]
    got, want = logits(loaded, ids), logits(source, ids)
    print(
        f"SmolLM2 f16 max |logit diff| = {(got - want).abs().max().item():.2e} (max |logit| "
        f"{want.abs().max().item():.1f})"
    )
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    for prompt in ["The capital of France is", "Roger Federer plays", "def fibonacci(n):"]:
        ids = source_tok(prompt)["input_ids"]
        assert loaded_tok(prompt)["input_ids"] == ids
        assert greedy(loaded, ids, n=10) == greedy(source, ids, n=10), prompt

    # Without source_gguf, the tokenizer metadata rebuilt from the in-memory tokenizer matches the file's.
    rebuilt = {key: value for key, value, *_ in tokenizer_metadata(source_tok, source.config.vocab_size)}
    original = {key: value for key, value, *_ in metadata_from_gguf(smollm2, "llama")}
    for key in (
        "tokens",
        "token_type",
        "merges",
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "padding_token_id",
        "add_bos_token",
    ):
        assert rebuilt[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    assert rebuilt["tokenizer.chat_template"] == original["tokenizer.chat_template"]
