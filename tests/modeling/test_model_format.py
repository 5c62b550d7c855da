"""The DarwinLM format: save -> load with stock transformers in a clean process, without this package."""

import json

import pytest
import torch
from conftest import load_in_clean_process, tiny_model

from darwinlm_foundry.modeling import DarwinLMConfig, DarwinLMForCausalLM
from darwinlm_foundry.structure.shrinking import shrink_model
from darwinlm_foundry.structure.units import Unit

@pytest.mark.parametrize('family', ['llama_mha', 'qwen2'])
def test_save_load_clean_process(family, tmp_path):
    model = tiny_model(family, attn_implementation='sdpa')
    kept = {Unit(0, 'attn'): [1, 3], Unit(0, 'mlp'): list(range(0, 96, 4)), Unit(1, 'attn'): [],
            Unit(2, 'mlp'): []}
    shrunk = shrink_model(model, kept)
    shrunk.save_pretrained(tmp_path / 'pruned')
    config = json.loads((tmp_path / 'pruned' / 'config.json').read_text())
    assert config['auto_map'] == {'AutoConfig': 'configuration_darwinlm.DarwinLMConfig',
                                  'AutoModelForCausalLM': 'modeling_darwinlm.DarwinLMForCausalLM'}
    assert config['layer_heads'] == [[1, 3], [], [0, 1, 2, 3]]
    assert config['layer_intermediate_sizes'] == [24, 96, 0]
    assert (tmp_path / 'pruned' / 'modeling_darwinlm.py').exists()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = shrunk(ids).logits
    assert torch.equal(load_in_clean_process(tmp_path / 'pruned', ids, tmp_path), expected)


def test_round_trip_in_process(tmp_path):
    model = shrink_model(tiny_model('mistral'), {Unit(1, 'attn'): [2], Unit(1, 'mlp'): [5, 6, 7]})
    model.save_pretrained(tmp_path)
    loaded = DarwinLMForCausalLM.from_pretrained(tmp_path, attn_implementation='eager')
    assert isinstance(loaded.config, DarwinLMConfig)
    assert loaded.config.base_model_type == 'mistral'
    assert loaded.config.layer_kv(1) == (2, [1])
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match='one entry per layer'):
        DarwinLMConfig(num_hidden_layers=2, layer_heads=[[0]])
    with pytest.raises(ValueError, match='distinct indices'):
        DarwinLMConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, layer_heads=[[0, 0]])
    with pytest.raises(ValueError, match='intermediate size'):
        DarwinLMConfig(num_hidden_layers=1, intermediate_size=8, layer_intermediate_sizes=[9])
