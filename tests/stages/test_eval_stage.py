"""The eval stage's held-out scoring: one model at a time beside the dense one, the same numbers as all models
side by side, and a re-run after a crash scores only the models without a row."""

import json
import os

import pytest
import torch
import transformers

from darwinlm_foundry.eval.heldout import heldout_metrics
from darwinlm_foundry.stages import eval as eval_stage
from darwinlm_foundry.structure.shrinking import shrink_model
from darwinlm_foundry.structure.units import Unit


def _dense(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def model_dirs(tmp_path, llama2_tokenizer):
    dense = _dense()
    models = {'dense': dense, 'pruned': shrink_model(dense, {Unit(0, 'attn'): [1, 2], Unit(1, 'mlp'): [3, 7, 9]}),
              'other': _dense(seed=1)}
    paths = {}
    for label, model in models.items():
        paths[label] = str(tmp_path / label)
        model.save_pretrained(paths[label])
        llama2_tokenizer.save_pretrained(paths[label])
    return models, paths


def test_eval_rows_equal_side_by_side_scores_and_resume(tmp_path, wiki_shards, model_dirs, monkeypatch):
    models, paths = model_dirs
    stage_dir, out = tmp_path / 'stage', tmp_path / 'stage' / 'eval.json'
    loads = []
    from darwinlm_foundry.utils import checkpoints
    real_load = checkpoints.load_hf_model

    def counting_load(path, *args, **kwargs):
        loads.append(os.path.basename(path))
        if loads[-1] == 'other' and fail['other']:
            raise RuntimeError('killed')
        return real_load(path, *args, **kwargs)
    monkeypatch.setattr(checkpoints, 'load_hf_model', counting_load)
    run = dict(paths=paths, dense='dense', shards=str(wiki_shards), heldout_sequences=3, icl=None,
               stage_dir=str(stage_dir), out_path=str(out), by_source=True)

    # a crash while loading the third model: the first two rows are kept
    fail = {'other': True}
    with pytest.raises(RuntimeError, match='killed'):
        eval_stage.evaluate_models(**run)
    assert loads == ['dense', 'pruned', 'other'] and not out.exists()
    assert sorted(p.name for p in (stage_dir / 'rows').iterdir()) == ['dense.json', 'pruned.json']

    # the re-run loads the dense model (the reference) and the missing one only
    fail['other'], loads[:] = False, []
    eval_stage.evaluate_models(**run)
    assert loads == ['dense', 'other']
    rows = {r['method']: r for r in json.loads(out.read_text())['rows']}
    assert list(rows) == ['dense', 'pruned', 'other']

    # the numbers are those of all three models scored side by side
    tokens = eval_stage._heldout_tokens(str(wiki_shards), 3)
    together = heldout_metrics(models, 'dense', tokens)
    by_source = eval_stage._heldout_by_source(str(wiki_shards), transformers.AutoTokenizer.from_pretrained(
        paths['dense']), 3)
    assert by_source
    for label, model in models.items():
        assert rows[label]['params'] == sum(p.numel() for p in model.parameters())
        assert rows[label]['heldout_ppl'] == pytest.approx(together[label]['ppl'], rel=1e-6)
        assert rows[label]['heldout_kl'] == pytest.approx(together[label]['kl'], rel=1e-5, abs=1e-8)
        for name, seqs in by_source.items():
            ref = heldout_metrics(models, 'dense', seqs, batch_size=4)[label]
            assert rows[label]['heldout_by_source'][name]['ppl'] == pytest.approx(ref['ppl'], rel=1e-6)
            assert rows[label]['heldout_by_source'][name]['tokens'] == seqs.numel()
    assert rows['dense']['heldout_kl'] == 0 and rows['other']['heldout_kl'] > rows['pruned']['heldout_kl'] > 0

    # nothing changed: nothing is loaded; a rewritten model is scored again, alone
    loads[:] = []
    eval_stage.evaluate_models(**run)
    assert loads == []
    models['pruned'].save_pretrained(paths['pruned'])
    eval_stage.evaluate_models(**run)
    assert loads == ['dense', 'pruned']
    # other settings score everything again
    loads[:] = []
    eval_stage.evaluate_models(**{**run, 'heldout_sequences': 2})
    assert loads == ['dense', 'pruned', 'other']
