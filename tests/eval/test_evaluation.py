"""Evaluation: foundry ICL eval + gauntlet on a tiny pruned model, lm-eval on an exported one, held-out ppl/KL."""

import json
import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import REPO, SHARED_DATA, tiny_model

from darwinlm_foundry.eval import heldout
from darwinlm_foundry.eval import icl as ev
from darwinlm_foundry.eval import lm_eval as lme
from darwinlm_foundry.structure.shrinking import shrink_model
from darwinlm_foundry.structure.units import Unit

# foundry's local task files: the tests cover all 9 local tasks, of which the package ships 6 (100 rows each)
ICL_DIR = SHARED_DATA / 'icl'
REPO_YAML = REPO / 'yamls' / 'eval_gauntlet_local.yaml'


def _tiny_dense(seed=0, vocab=32000):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = 'sdpa'
    return transformers.LlamaForCausalLM(cfg).eval()


def _tiny_pruned():
    return shrink_model(_tiny_dense(), {Unit(0, 'attn'): [0, 3], Unit(1, 'mlp'): list(range(0, 64, 2)),
                                        Unit(1, 'attn'): [2]})


@pytest.fixture(scope='module')
def tokenizer(llama2_tokenizer):
    return llama2_tokenizer


def _saved(tmp_path_factory, name, model, tokenizer):
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope='module')
def pruned_dir(tmp_path_factory, tokenizer):
    return _saved(tmp_path_factory, 'pruned', _tiny_pruned(), tokenizer)


# ------------------------------------------------------------------------------------ task configs (pure)
def test_yaml_fragment_is_the_builder_output():
    from omegaconf import OmegaConf as om
    loaded = om.load(REPO_YAML)
    assert om.to_container(loaded) == ev.icl_yaml_fragment()
    loaded.variables.icl_data_dir = str(ICL_DIR)  # the data directory is one setting
    resolved = om.to_container(loaded, resolve=True)
    assert resolved['icl_tasks'] == ev.icl_tasks_config(ICL_DIR, ev.LOCAL_TASKS)
    assert {c['name'] for c in resolved['eval_gauntlet']['categories']} == set(ev.GAUNTLET_CATEGORIES)


def test_task_types_match_the_rows():
    """Each local task's type fits its file's fields (foundry's formats)."""
    fields = {'multiple_choice': {'query', 'choices', 'gold'}, 'schema': {'context_options', 'continuation', 'gold'},
              'language_modeling': {'context', 'continuation'}}
    for task in ev.LOCAL_TASKS:
        with open(ICL_DIR / task.file_name) as f:
            row = json.loads(f.readline())
        assert set(row) == fields[task.icl_task_type], task.label
        if 'choices' in row:
            assert task.random_baseline == pytest.approx(1 / len(row['choices']))


def test_paper_tasks_missing_locally_are_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger='darwinlm_foundry.eval.icl'):
        entries = ev.icl_tasks_config(ICL_DIR)
    assert [e['label'] for e in entries] == ['arc_easy', 'logi_qa', 'piqa', 'boolq', 'winogrande', 'arc_challenge']
    assert {e['label']: e['num_fewshot'] for e in entries}['arc_challenge'] == [25]
    for missing in ('sciq', 'mmlu', 'hellaswag'):
        assert any(missing in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        ev.icl_tasks_config(ICL_DIR / 'nope')


# ------------------------------------------------------------------------------------ foundry ICL eval
def test_icl_gauntlet_on_pruned_model(pruned_dir, tokenizer):
    limit = 3
    result = ev.run_icl_eval(pruned_dir, tokenizer, ICL_DIR, ev.LOCAL_TASKS, limit=limit, device='cpu',
                             max_seq_len=1024)
    assert set(result.tasks) == {t.key for t in ev.LOCAL_TASKS}
    for key, acc in result.tasks.items():  # exactly `limit` examples were scored per task
        assert 0.0 <= acc <= 1.0 and abs(acc * limit - round(acc * limit)) < 1e-6, (key, acc)
    # The gauntlet average is foundry's: per category, mean accuracy above chance rescaled; then the mean.
    by_cat = {}
    for task in ev.LOCAL_TASKS:
        score = (result.tasks[task.key] - task.random_baseline) / (1 - task.random_baseline)
        by_cat.setdefault(task.category, []).append(score)
    expected = sum(sum(v) / len(v) for v in by_cat.values()) / len(by_cat)
    assert result.gauntlet_average == pytest.approx(expected)
    assert result.mean_accuracy == pytest.approx(sum(result.tasks.values()) / len(result.tasks))
    assert result.skipped == []


def _context_sensitive_tiny():
    """conftest's tiny Llama with 10x the default init scale: its choice scores depend on the context and the
    positions (at the default scale a random model scores choices nearly context-free, so an error in how the
    fast path feeds the context would not change its accuracies)."""
    return tiny_model('llama_gqa', vocab_size=32000, max_position_embeddings=1024, initializer_range=0.2,
                      attn_implementation='sdpa')


@pytest.fixture(scope='module')
def sensitive_dir(tmp_path_factory, tokenizer):
    return _saved(tmp_path_factory, 'sensitive', _context_sensitive_tiny(), tokenizer)


def test_fast_icl_eval_equals_padded_reference(sensitive_dir, tokenizer, capsys):
    """The fast path (unpadded length-sorted batches, shared prefixes run once, logits only where scored) gives
    exactly foundry's padded accuracies: every local task type (multiple choice, schema, language modelling),
    0 to 25 shots, with 25-shot contexts trimmed to max_seq_len (choices then share no prefix)."""
    kwargs = dict(limit=8, device='cpu', max_seq_len=256, device_eval_batch_size=8)
    threads = torch.get_num_threads()
    padded = ev.run_icl_eval(sensitive_dir, tokenizer, ICL_DIR, ev.LOCAL_TASKS, fast=False, progress=False, **kwargs)
    assert capsys.readouterr().out == ''
    fast = ev.run_icl_eval(sensitive_dir, tokenizer, ICL_DIR, ev.LOCAL_TASKS, **kwargs)
    assert torch.get_num_threads() == threads  # restored after the eval
    assert set(fast.tasks) == {t.key for t in ev.LOCAL_TASKS}
    assert fast.tasks == padded.tasks  # exact: same examples, same metric, logits equal up to rounding
    assert fast.gauntlet == padded.gauntlet and fast.mean_accuracy == padded.mean_accuracy
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('[darwinlm] ICL task')]
    assert len(lines) == len(ev.LOCAL_TASKS) and all('accuracy' in line for line in lines)


@pytest.mark.parametrize('make_model', [_tiny_pruned, _context_sensitive_tiny], ids=['darwinlm_pruned', 'llama'])
def test_score_icl_batch_logits_equal_the_padded_forward(tokenizer, make_model):
    """Per scored position, the fast scorer's logits are the full padded forward's (tolerance: rounding), and
    the fast batches are cut after their longest sequence."""
    from composer.utils import dist
    if not dist.is_initialized():
        dist.initialize_dist('cpu')
    model = make_model().eval()
    max_seq_len, limit = 256, 4
    tasks = [t for t in ev.LOCAL_TASKS
             if t.label in ('arc_easy', 'winogrande', 'arc_challenge', 'lambada_openai_small')]
    padded, *_ = ev.build_icl_eval(tokenizer, ICL_DIR, tasks, limit=limit, max_seq_len=max_seq_len, fast=False,
                                   device_eval_batch_size=8)
    fast, *_ = ev.build_icl_eval(tokenizer, ICL_DIR, tasks, limit=limit, max_seq_len=max_seq_len,
                                 device_eval_batch_size=8)
    for ref_ev, fast_ev in zip(padded, fast):
        batches = [b for _, b in zip(range(ref_ev.subset_num_batches), ref_ev.dataloader.dataloader)]
        n_fast = sum(b['input_ids'].shape[0] for b in fast_ev.dataloader.dataloader)
        assert n_fast == sum(b['input_ids'].shape[0] for b in batches)  # the same `limit` examples
        for batch in batches:
            assert batch['input_ids'].shape[1] == max_seq_len  # foundry pads every sequence
            with torch.no_grad():
                ref = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
            cut = fast_ev.dataloader.batch_transforms(dict(batch))
            assert cut['input_ids'].shape[1] == max(int(c[-1]) + 1 for c in batch['continuation_indices'])
            got = ev.score_icl_batch(model, cut)
            for row, cont in enumerate(batch['continuation_indices']):
                torch.testing.assert_close(got[row, cont - 1], ref[row, cont - 1], rtol=1e-5, atol=1e-5)
        if ref_ev.label.startswith('arc_easy'):  # short 0-shot questions: far below max_seq_len
            widths = [fast_ev.dataloader.batch_transforms(b)['input_ids'].shape[1]
                      for b in fast_ev.dataloader.dataloader]
            assert max(widths) < max_seq_len // 4


# ------------------------------------------------------------------------------------ lm-eval harness
def test_lm_eval_on_exported_model(tmp_path, tokenizer):
    from darwinlm_foundry.eval.export import export_pruned
    out = export_pruned(_tiny_pruned(), tmp_path / 'export', tokenizer=tokenizer, base_model='tiny-llama-test',
                        data_note='random weights')
    limit = 2
    results = lme.run_lm_eval(out, data_dir=ICL_DIR, limit=limit, batch_size=4)
    assert set(results) == {t.name for t in lme.LOCAL_LM_EVAL_TASKS}
    for task, metrics in results.items():
        assert 0.0 <= metrics['acc'] <= 1.0 and (metrics['acc'] * limit) % 1 == 0, (task, metrics)
    with pytest.raises(lme.DatasetUnreachableError, match='unreachable offline'):
        lme.run_lm_eval(out, tasks=['arc_easy'], limit=1)


def test_lm_eval_task_yamls(tmp_path):
    names = lme.write_lm_eval_tasks(ICL_DIR, tmp_path)
    assert names == [t.name for t in lme.LOCAL_LM_EVAL_TASKS]
    text = (tmp_path / 'local_winogrande.yaml').read_text()
    assert 'dataset_path: json' in text and str(ICL_DIR.resolve() / 'winogrande.jsonl') in text
    assert 'num_fewshot: 5' in text


# ------------------------------------------------------------------------------------ held-out ppl / KL
def test_heldout_metrics_brute_force(tmp_path):
    dense = _tiny_dense(vocab=64)
    models = {'dense': dense, 'pruned': shrink_model(dense, {Unit(0, 'attn'): [1], Unit(1, 'mlp'): [3, 7]}),
              'other': _tiny_dense(seed=1, vocab=64)}
    tokens = torch.randint(0, 64, (5, 9), generator=torch.Generator().manual_seed(0))
    got = heldout.heldout_metrics(models, 'dense', tokens, batch_size=2)
    assert got['dense']['kl'] == 0.0
    with torch.no_grad():
        ref = dense(tokens).logits[:, :-1]
        for name, model in models.items():
            logits = model(tokens).logits[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1)).item()
            kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                          reduction='sum').item() / logits[..., 0].numel()
            assert got[name]['ppl'] == pytest.approx(math.exp(nll), rel=1e-5)
            assert got[name]['nll'] == pytest.approx(nll, rel=1e-5)
            # KL is a difference of log-probs of size ~log(64): fp32 logits from batches of 2 and of 5 round
            # apart by ~1e-7 per term, so a small KL (~7e-4) is only good to ~1e-6 absolute (CI's CPU: 1.07e-7 off)
            assert got[name]['kl'] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert got['pruned']['kl'] > 0 and got['other']['kl'] > got['pruned']['kl']
    with pytest.raises(ValueError, match='not among'):
        heldout.heldout_metrics(models, 'missing', tokens)
    # the cached-dense form gives the same numbers, one model at a time; its targets kept in files, the very same
    reference = heldout.HeldoutReference(dense, tokens, batch_size=2)
    spilled = heldout.HeldoutReference(dense, tokens, batch_size=2, spill_dir=str(tmp_path))
    assert spilled.scratch and os.path.getsize(f'{spilled.scratch}/targets.probs.bin') == 5 * 8 * 64 * 4
    for name, model in models.items():
        one = reference.score(model)
        assert one['params'] == sum(p.numel() for p in model.parameters())
        for key in ('ppl', 'nll', 'kl'):
            # (the reference's KL is neg. entropy minus cross term, both ~log(64): the same ~1e-6 absolute)
            assert one[key] == pytest.approx(got[name][key], rel=1e-5, abs=1e-6), (name, key)
        assert spilled.score(model) == one
    scratch = spilled.scratch
    del spilled
    assert not os.path.exists(scratch) and os.listdir(tmp_path) == []
