"""The eval stage's held-out scoring: models in groups that fit a memory budget beside the dense one, the same
numbers whatever the grouping and as all models side by side, and a re-run after a crash scores only what has
no row (held-out numbers are kept when ICL is cut off)."""

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

    # a budget of one byte: one model per group beside the dense one; a crash while loading the third model
    # keeps the first two rows
    run['resident_bytes'] = 1
    fail = {'other': True}
    with pytest.raises(RuntimeError, match='killed'):
        eval_stage.evaluate_models(**run)
    assert loads == ['dense', 'pruned', 'other'] and not out.exists()
    assert sorted(p.name for p in (stage_dir / 'rows').iterdir()) == ['dense.json', 'pruned.json']

    # the re-run (default budget) loads the dense model (the reference) and the missing one only
    fail['other'], loads[:] = False, []
    del run['resident_bytes']
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


def test_grouped_scoring_loads_each_model_once_and_equals_one_by_one(tmp_path, wiki_shards, model_dirs, monkeypatch):
    models, paths = model_dirs
    loads = []
    from darwinlm_foundry.utils import checkpoints
    real_load = checkpoints.load_hf_model
    monkeypatch.setattr(checkpoints, 'load_hf_model', lambda path, *a, **k: loads.append(os.path.basename(path))
                        or real_load(path, *a, **k))
    base = dict(paths=paths, dense='dense', shards=str(wiki_shards), heldout_sequences=3, icl=None, by_source=True)
    assert [len(g) for g in eval_stage._resident_groups(list(paths), paths, 'dense', 1)] == [1, 1, 1]
    one_each = eval_stage._fp32_bytes(paths['pruned'])
    assert one_each == pytest.approx(4 * sum(p.numel() for p in models['pruned'].parameters()), abs=64 * 1024)
    assert eval_stage._resident_groups(list(paths), paths, 'dense', 10 ** 12) == [['dense', 'pruned', 'other']]

    results = {}
    for budget in (1, None):
        stage = tmp_path / f'stage_{budget}'
        loads[:] = []
        eval_stage.evaluate_models(**base, stage_dir=str(stage), out_path=str(stage / 'eval.json'),
                                   resident_bytes=budget)
        assert loads == ['dense', 'pruned', 'other']  # the dense model once, every other model once
        results[budget] = json.loads((stage / 'eval.json').read_text())['rows']
    for a, b in zip(results[1], results[None]):
        assert a == b  # bit-identical: the same arithmetic per model and batch


def test_cut_off_icl_keeps_the_heldout_numbers(tmp_path, wiki_shards, model_dirs, monkeypatch):
    models, paths = model_dirs
    from darwinlm_foundry.eval import icl as icl_mod
    from darwinlm_foundry.utils import checkpoints
    loads, icl_calls = [], []
    real_load = checkpoints.load_hf_model
    monkeypatch.setattr(checkpoints, 'load_hf_model', lambda path, *a, **k: loads.append(os.path.basename(path))
                        or real_load(path, *a, **k))

    class Result:
        tasks, mean_accuracy, gauntlet_average = {'arc_easy/0-shot': 0.5}, 0.5, 0.0

    def fake_icl(path, *args, **kwargs):
        icl_calls.append(os.path.basename(path))
        if icl_calls[-1] == 'other' and len(icl_calls) == 3:
            raise RuntimeError('killed')
        return Result()
    monkeypatch.setattr(icl_mod, 'run_icl_eval', fake_icl)
    run = dict(paths=paths, dense='dense', shards=str(wiki_shards), heldout_sequences=2, icl={'tasks': ['arc_easy']},
               stage_dir=str(tmp_path / 'stage'), out_path=str(tmp_path / 'stage' / 'eval.json'))
    with pytest.raises(RuntimeError, match='killed'):
        eval_stage.evaluate_models(**run)
    assert loads == ['dense', 'pruned', 'other'] and icl_calls == ['dense', 'pruned', 'other']
    saved = json.loads((tmp_path / 'stage' / 'rows' / 'other.json').read_text())
    assert saved['complete'] is False and 'tasks' not in saved['row'] and saved['row']['heldout_ppl'] > 0

    loads[:], icl_calls[:] = [], []
    eval_stage.evaluate_models(**run)
    assert loads == [] and icl_calls == ['other']  # no held-out scoring again, ICL for the cut-off model only
    rows = {r['method']: r for r in json.loads((tmp_path / 'stage' / 'eval.json').read_text())['rows']}
    assert rows['other']['heldout_ppl'] == saved['row']['heldout_ppl'] and rows['other']['tasks'] == Result.tasks
