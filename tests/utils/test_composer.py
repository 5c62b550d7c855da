"""transient_trainer: a closed short-lived Composer Trainer keeps nothing alive (the search runs hundreds)."""

import gc
import weakref

import torch


def _fit_once(tiny):
    from composer.models import HuggingFaceModel
    from composer.optim import DecoupledAdamW

    from darwinlm_foundry.utils.composer import transient_trainer

    ids = torch.randint(0, tiny.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    batches = [{'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids}]
    model = HuggingFaceModel(tiny, use_logits=True, metrics=[], shift_labels=True)
    before = tiny.model.layers[0].mlp.down_proj.weight.detach().clone()
    with transient_trainer(model=model, train_dataloader=batches, max_duration='1ba',
                           optimizers=DecoupledAdamW(model.parameters(), lr=1e-2), device='cpu', progress_bar=False,
                           device_train_microbatch_size=4,
                           log_to_console=False, loggers=[], train_subset_num_batches=-1) as trainer:
        trainer.fit()
    assert not torch.equal(before, tiny.model.layers[0].mlp.down_proj.weight)  # it did train
    return weakref.ref(model), weakref.ref(trainer.state.optimizers[0])


def test_transient_trainer_frees_model_and_optimizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    _fit_once(LlamaForCausalLM(config))  # the first Trainer's lazy imports may pin their caller's frame, once
    refs = [_fit_once(LlamaForCausalLM(config)) for _ in range(3)]
    gc.collect()
    # Composer's Engine would otherwise hold every State (model + optimizer) in an atexit registration
    assert [(model() is None, opt() is None) for model, opt in refs] == [(True, True)] * 3
