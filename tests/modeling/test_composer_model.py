"""A DarwinLM checkpoint trains under llm-foundry's model registry and foundry's HF export loads back."""

import pytest
import torch
from conftest import load_in_clean_process, tiny_model

from darwinlm_foundry.structure.shrinking import shrink_model
from darwinlm_foundry.structure.units import Unit


@pytest.fixture(scope='module')
def tokenizer(llama2_tokenizer):
    return llama2_tokenizer


def test_registry_lists_our_entries():
    from llmfoundry import registry
    assert 'darwinlm' in registry.models.get_all()


def test_foundry_trains_and_exports_darwinlm(tmp_path, tokenizer):
    from composer import Trainer
    from composer.utils import dist
    from llmfoundry.callbacks import HuggingFaceCheckpointer
    from llmfoundry.utils.builders import build_composer_model

    dense = tiny_model('llama_gqa', vocab_size=len(tokenizer), hidden_size=32, head_dim=8,
                       intermediate_size=64, num_hidden_layers=2, attn_implementation='sdpa')
    shrunk = shrink_model(dense, {Unit(0, 'attn'): [0, 3], Unit(0, 'mlp'): list(range(32)), Unit(1, 'attn'): []})
    shrunk.save_pretrained(tmp_path / 'pruned')
    tokenizer.save_pretrained(tmp_path / 'pruned')

    model = build_composer_model(
        name='darwinlm',
        cfg={'pretrained_model_name_or_path': str(tmp_path / 'pruned'), 'pretrained': True,
             'trust_remote_code': False, 'use_train_metrics': False},
        tokenizer=tokenizer)
    assert type(model.model).__name__ == 'DarwinLMForCausalLM'
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (8, 16), generator=gen)
    batches = [{'input_ids': ids[i:i + 2], 'attention_mask': torch.ones_like(ids[i:i + 2]),
                'labels': ids[i:i + 2]} for i in range(0, 8, 2)]
    dist.initialize_dist('cpu')
    trainer = Trainer(
        model=model, train_dataloader=batches, max_duration='4ba', device='cpu', device_train_microbatch_size=2,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2),
        callbacks=[HuggingFaceCheckpointer(save_folder=str(tmp_path / 'export'), save_interval='4ba')],
        progress_bar=False, log_to_console=False, loggers=[])
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer.fit()
    after = model.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), 'training changed nothing'
    assert set(before) == set(after)  # shapes / modules unchanged by training
    assert after['model.layers.0.self_attn.o_proj.weight'].shape == (32, 16)
    trainer.close()

    export = tmp_path / 'export' / 'huggingface' / 'ba4'
    model.model.eval()
    with torch.no_grad():
        expected = model.model(ids[:2]).logits
    got = load_in_clean_process(export, ids[:2], tmp_path)
    assert (got - expected).abs().max().item() <= 1e-5
