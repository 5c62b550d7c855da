"""Composer trainers inside a long process: closed and dropped, they keep nothing alive (the search runs hundreds,
the chain post-trains and goes on); alive at exit, they are still closed then."""

import gc
import os
import weakref

import pytest
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
    # the first fit included: its lazy import of Composer no longer pins its frame (test_memory.py)
    refs = [_fit_once(LlamaForCausalLM(config)) for _ in range(3)]
    gc.collect()
    # Composer's Engine would otherwise hold every State (model + optimizer) in an atexit registration
    assert [(model() is None, opt() is None) for model, opt in refs] == [(True, True)] * 3


def test_weak_engine_atexit_closes_a_live_trainer_at_exit_and_frees_a_closed_one(monkeypatch):
    """Composer's at-exit close still runs for a trainer alive at exit; a closed, dropped one is not kept for it."""
    import atexit

    from composer import Callback, Trainer
    from composer.models import HuggingFaceModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from darwinlm_foundry.utils.composer import weak_engine_atexit

    closed = []

    class Closes(Callback):
        def __init__(self, name):
            self.name = name

        def close(self, state, logger):
            closed.append(self.name)

    registered = []
    monkeypatch.setattr(atexit, 'register', lambda func, *args, **kwargs: registered.append((func, args)))
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)

    def trainer(name):
        model = HuggingFaceModel(LlamaForCausalLM(config), use_logits=True, metrics=[], shift_labels=True)
        return Trainer(model=model, device='cpu', callbacks=[Closes(name)], loggers=[], log_to_console=False,
                       progress_bar=False)

    with weak_engine_atexit():
        alive, dropped = trainer('alive'), trainer('dropped')
    hooks = [(f, a) for f, a in registered if f.__name__ == '_close_if_alive']
    assert [args[1][0]() for _, args in hooks] == [alive.state, dropped.state]  # weak references to the states
    dropped.close()
    state = weakref.ref(dropped.state)
    del dropped
    gc.collect()
    assert state() is None  # its registration did not keep it
    for hook, args in hooks:  # what the interpreter does at exit
        hook(*args)
    assert closed == ['dropped', 'alive']


@pytest.mark.slow(seconds=40)
def test_train_stage_leaves_no_trainer_state_behind(tmp_path, wiki_shards, llama2_tokenizer):
    """The chain post-trains in its one process and goes on: after the train stage no Composer State (model,
    AdamW moments) stays alive (Composer's own at-exit registration kept ~1.3 GB per SmolLM2 train stage)."""
    from types import SimpleNamespace

    from composer.core import State
    from conftest import tiny_model

    from darwinlm_foundry.stages.train import run_train

    gc.collect()
    earlier = [obj for obj in gc.get_objects() if isinstance(obj, State)]  # other tests' in this worker
    model_dir = tmp_path / 'dense'
    tiny_model('llama_gqa', vocab_size=32000, hidden_size=32, head_dim=8, intermediate_size=64,
               num_hidden_layers=2).save_pretrained(model_dir)
    llama2_tokenizer.save_pretrained(model_dir)
    train = {'max_seq_len': 64, 'max_duration': '2ba', 'global_train_batch_size': 2, 'device_train_batch_size': 2,
             'device_train_microbatch_size': 2, 'device_eval_batch_size': 2, 'precision': 'fp32',
             'model': {'name': 'darwinlm', 'pretrained': True, 'use_train_metrics': False},
             'optimizer': {'name': 'decoupled_adamw', 'lr': 1e-3, 'weight_decay': 0.0},
             'scheduler': {'name': 'constant_with_warmup', 't_warmup': '0ba'},
             'progress_bar': False, 'log_to_console': False, 'python_log_level': None}
    out = run_train(SimpleNamespace(train=train), str(tmp_path / 'train'),
                    {'model': {'model': str(model_dir)}, 'data': {'shards': str(wiki_shards)}},
                    SimpleNamespace(seed=0), {})
    assert os.path.isfile(os.path.join(out['model'], 'config.json'))
    gc.collect()
    assert [obj for obj in gc.get_objects() if isinstance(obj, State) and all(obj is not e for e in earlier)] == []
