"""Shared fixtures: offline environment, a word-level tokenizer and tiny random models of eleven families."""

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

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega Paris London Rome Berlin Madrid football tennis chess "
    "golf piano violin red green blue is a the of in plays lives The Therefore Because I You"
).split()


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


def tiny_config(family: str, vocab_size: int, n_layers: int = 4, d: int = 64, d_ff: int = 256, **overrides):
    """A small randomly initialised config of one architecture family; ``overrides`` replace any of
    its keyword arguments (the decoder families' names, e.g. ``max_position_embeddings``)."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        GPTJConfig,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, initializer_range=0.1)
    if family == "gpt2":
        return GPT2Config(n_layer=n_layers, n_embd=d, n_head=4, n_inner=d_ff, n_positions=128, **common)
    if family == "gptj":
        return GPTJConfig(n_layer=n_layers, n_embd=d, n_head=4, n_inner=d_ff, rotary_dim=8, n_positions=128, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(
            num_hidden_layers=n_layers,
            hidden_size=d,
            num_attention_heads=4,
            intermediate_size=d_ff,
            max_position_embeddings=128,
            **common,
        )
    decoder = dict(
        num_hidden_layers=n_layers,
        hidden_size=d,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=d_ff,
        max_position_embeddings=128,
        **common,
    )
    decoder.update(overrides)
    if family in ("llama", "mistral", "qwen2"):
        return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family](**decoder)
    decoder["pad_token_id"] = 0  # the defaults point past a tiny vocabulary
    # Gemma: a sliding window shorter than the test prompts, so hybrid attention really masks;
    # Gemma 2 keeps its default logit soft-capping (final 30, attention 50), Gemma 3 gets a final one.
    if family == "gemma2":
        return Gemma2Config(head_dim=d // 4, sliding_window=4, **decoder)
    if family == "gemma3":
        return Gemma3TextConfig(
            head_dim=d // 4, sliding_window=4, sliding_window_pattern=2, final_logit_softcapping=30.0, **decoder
        )
    if family == "qwen3":
        return Qwen3Config(head_dim=d // 4, **decoder)
    return {"phi3": Phi3Config, "olmo2": Olmo2Config}[family](**decoder)


#: The six original families, whose edits are pinned to references.
BASE_FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2")
#: Families added later: Gemma 2/3 (hybrid sliding-window attention, soft-capping, post-norm MLP),
#: Qwen 3, Phi-3 (fused gate_up_proj) and OLMo 2 (post-norm attention and MLP).
NEW_FAMILIES = ("gemma2", "gemma3", "qwen3", "phi3", "olmo2")
FAMILIES = BASE_FAMILIES + NEW_FAMILIES
#: Families whose MLP output is normalised before it joins the residual stream.
POST_NORM_FAMILIES = ("gemma2", "gemma3", "olmo2")


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


@pytest.fixture(autouse=True)
def _mlflow_uris_stay_put():
    """MLflow's ``set_tracking_uri`` / ``set_registry_uri`` (which every :class:`Registry` calls) also
    write ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` for subprocesses: put the environment back
    after each test, so that a test's store never leaks into the next one's subprocesses."""
    import os

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {n: os.environ.get(n) for n in names}
    yield
    for n, value in before.items():
        if value is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = value
