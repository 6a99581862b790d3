"""The typed hyperparameter config and its per-architecture published defaults."""

from __future__ import annotations

import pytest

import editflow
from editflow.config import MemitConfig, default_config, parse_layers, scaled_layers


def test_published_defaults_per_family():
    gptj = default_config("gptj", 28)
    assert gptj.layers == (3, 4, 5, 6, 7, 8) and gptj.mom2_update_weight == 15000 and gptj.v_num_grad_steps == 25
    xl = default_config("gpt2", 48)
    assert xl.layers == (13, 14, 15, 16, 17) and xl.mom2_update_weight == 20000 and xl.v_num_grad_steps == 20
    llama = default_config("llama", 32)
    assert llama.layers == (4, 5, 6, 7, 8) and llama.clamp_norm_factor == 4.0 and llama.v_weight_decay == 1e-3
    assert default_config("qwen2", 32) == llama and default_config("mistral", 32) == llama
    assert default_config("gpt_neox", 28).layers == gptj.layers


def test_layers_scale_to_depth_and_overrides_win():
    assert scaled_layers(48, (13, 14, 15, 16, 17), 12) == (3, 4, 5, 6, 7)
    assert scaled_layers(28, (3, 4, 5, 6, 7, 8), 4) == (0, 1, 2, 3)
    cfg = default_config("gpt2", 12, {"layers": [2, 3], "mom2_update_weight": 100}, v_lr="0.1")
    assert cfg.layers == (2, 3) and cfg.mom2_update_weight == 100 and cfg.v_lr == 0.1


def test_unknown_and_invalid_keys_are_errors():
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['v_lrr'\]"):
        MemitConfig().replace(v_lrr=1)
    with pytest.raises(ValueError, match="ascending"):
        MemitConfig(layers=(5, 3))
    with pytest.raises(ValueError, match="algorithm"):
        MemitConfig(algorithm="rome")
    with pytest.raises(ValueError, match="mode"):
        MemitConfig().replace(mode="diagonal")
    with pytest.raises(ValueError, match="cannot read"):
        MemitConfig().replace(v_num_grad_steps="many")


def test_strings_from_the_command_line_are_coerced():
    cfg = MemitConfig.from_dict({"layers": "3-5,7", "chunk_size": "10", "kl_factor": "1e-2", "layer_tmp": "none"})
    assert cfg.layers == (3, 4, 5, 7) and cfg.chunk_size == 10 and cfg.kl_factor == 0.01 and cfg.layer_tmp is None
    assert parse_layers("[1, 2]") == [1, 2]
    assert MemitConfig.from_dict(cfg.to_dict()) == cfg


def test_public_api_is_importable_from_the_package():
    assert editflow.MemitConfig is MemitConfig
    assert callable(editflow.edit) and callable(editflow.load_model) and callable(editflow.layer_covariances)
    with pytest.raises(AttributeError):
        editflow.nonexistent  # noqa: B018
