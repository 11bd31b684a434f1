from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModel, GPT2Config, GPT2Model
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed.quantization import bitnet_quantization_config, convert_to_bitlinear, find_transformer_blocks

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_every_block_linear_becomes_bitlinear_with_norm_and_exact_weights(backbone_dirs, family):
    model = AutoModel.from_pretrained(backbone_dirs[family])
    original = copy.deepcopy(model.state_dict())
    converted = convert_to_bitlinear(model, norm="all")

    assert {name.rsplit(".", 1)[-1] for name in converted} == PROJECTIONS
    assert len(converted) == len(PROJECTIONS) * model.config.num_hidden_layers
    assert not any(type(m) is nn.Linear for m in model.modules())
    for name in converted:
        layer = model.get_submodule(name)
        assert isinstance(layer, AutoBitLinear) and layer.online_quant
        assert torch.equal(layer.rms_norm.weight, torch.ones(layer.in_features))
    state = model.state_dict()
    for key, value in original.items():  # every pretrained tensor is kept bit for bit, embeddings and norms too
        assert torch.equal(state[key], value), key
    assert set(state) - set(original) == {f"{name}.rms_norm.weight" for name in converted}


def test_subln_puts_norms_only_before_o_and_down_proj(qwen3_dir):
    model = AutoModel.from_pretrained(qwen3_dir)
    converted = convert_to_bitlinear(model, norm="subln")
    with_norm = {name.rsplit(".", 1)[-1] for name in converted if model.get_submodule(name).rms_norm is not None}
    assert with_norm == {"o_proj", "down_proj"}
    assert len(converted) == len(PROJECTIONS) * model.config.num_hidden_layers


def test_bert_pooler_stays_full_precision_and_config_skips_it(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    converted = convert_to_bitlinear(model)
    assert find_transformer_blocks(model) == "encoder.layer"
    assert type(model.pooler.dense) is nn.Linear
    assert len(converted) == 6 * model.config.num_hidden_layers  # q, k, v, attention out, intermediate, output
    config = bitnet_quantization_config(model, use_rms_norm=True, rms_norm_eps=1e-6)
    assert config.modules_to_not_convert == ["pooler.dense"]


def test_architecture_without_linear_layers_is_refused():
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50))  # GPT-2 projections are Conv1D
    with pytest.raises(ValueError, match=r"GPT2Model has no nn\.Linear layers inside its transformer blocks.*Conv1D"):
        convert_to_bitlinear(model)


def test_unknown_norm_placement_is_refused(tiny_bert):
    with pytest.raises(ValueError, match="Unknown norm placement 'some'.*'all', 'subln'"):
        convert_to_bitlinear(copy.deepcopy(tiny_bert), norm="some")
