"""Shared fixtures: offline environment, a word-level tokenizer and tiny random models of six families."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega Paris London Rome Berlin Madrid football tennis chess "
         "golf piano violin red green blue is a the of in plays lives The Therefore Because I You").split()


def word_tokenizer():
    """A byte-level word tokenizer: every word (with and without a leading space) is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from editflow.models import prepare_tokenizer

    vocab = ["<eos>"] + ["Ġ" + w for w in WORDS] + list(WORDS) + ["Ġ.", ".", "{", "}", "'s"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(vocab))}, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>"))


def tiny_config(family: str, vocab_size: int, n_layers: int = 4, d: int = 64, d_ff: int = 256):
    """A small randomly initialised config of one architecture family."""
    from transformers import (GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              Qwen2Config)

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, initializer_range=0.1)
    if family == "gpt2":
        return GPT2Config(n_layer=n_layers, n_embd=d, n_head=4, n_inner=d_ff, n_positions=128, **common)
    if family == "gptj":
        return GPTJConfig(n_layer=n_layers, n_embd=d, n_head=4, n_inner=d_ff, rotary_dim=8,
                          n_positions=128, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=4,
                             intermediate_size=d_ff, max_position_embeddings=128, **common)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=d_ff, max_position_embeddings=128, **common)


FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2")


def tiny_model(family: str = "gpt2", seed: int = 0, **kw):
    """A tiny random model on editflow's default device (CUDA when selected, e.g. by gpu_check.sh)."""
    from transformers import AutoModelForCausalLM

    from editflow.models import default_device

    tok = word_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), **kw)).eval()
    return model.to(default_device()), tok


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests are small: one intra-op thread avoids oversubscription when workers run in parallel."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
