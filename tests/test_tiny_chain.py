"""The shipped tiny chain end to end (smallest settings) under Composer's launcher, then re-run: all skipped."""

import json
import os
import subprocess

import pytest
import torch
import yaml
from conftest import REPO
from test_train_resume import COMPOSER

from darwinlm_foundry.stages import load_run_yaml


def smallest(cfg, run_dir):
    """yamls/darwinlm_tiny.yaml with every budget cut to the bone (same stages, same keys)."""
    cfg['run_dir'] = str(run_dir)
    stages = {s['name']: s for s in cfg['stages']}
    stages['data']['splits'] = {'calibration': 0.08, 'search': 0.08, 'heldout': 0.08, 'train': 0.2}
    stages['dense']['settings'].update(hidden=80, intermediate=320, steps=8, warmup=2, batch_size=4, eval_seqs=4, eval_every=4)
    for name in ('database5', 'database6'):
        stages[name]['calibration'].update(num_sequences=8, batch_size=8)
    for name in ('search5', 'search6'):
        stages[name]['search'].update(generations=2, offspring=2, survivors=[1], fitness_tokens=[256],
                                      train_tokens=[256])
    for name in ('train5', 'train6'):
        stages[name]['train'].update(max_duration='2ba', save_interval='2ba')
    stages['eval'].update(heldout_sequences=4, icl={'limit': 2, 'device_eval_batch_size': 2, 'max_seq_len': 128},
                          lm_eval={'tasks': ['local_arc_easy'], 'limit': 2, 'batch_size': 2})
    return cfg


@pytest.mark.timeout(1500)
def test_tiny_chain_end_to_end_then_skipped(tmp_path):
    cfg = smallest(load_run_yaml(str(REPO / 'yamls' / 'darwinlm_tiny.yaml')), tmp_path / 'run')
    path = tmp_path / 'tiny.yaml'
    path.write_text(yaml.safe_dump(cfg))

    def run():
        out = subprocess.run([COMPOSER, '-n', '1', str(REPO / 'train.py'), str(path)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=1200, env=dict(os.environ, PYTHONUNBUFFERED='1'))
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        return out.stdout + out.stderr

    first = run()
    names = [s['name'] for s in cfg['stages']]
    for name in names:
        assert f'stage {name} (' in first and 'running' in first
    manifest = json.loads((tmp_path / 'run' / 'stages.json').read_text())['stages']
    assert list(manifest) == names
    export = manifest['export']['outputs']
    assert 'pruned model:' in first and export['model'] in first and export['report'] in first
    # The exported model is physically smaller than the dense one and carries its levels.
    exported = json.loads(open(os.path.join(export['model'], 'config.json')).read())
    assert exported['model_type'] == 'darwinlm' and exported['levels'] and exported['num_levels'] == 10
    # The card names the dense model the chain started from, never the pruned model itself.
    card = open(os.path.join(export['model'], 'README.md')).read()
    assert f"base_model: {manifest['dense']['outputs']['model']}" in card and 'Levels 0 (dense) .. 10;' in card
    # The uniform baseline (a search of 0 generations) is a recorded stage with the uniform level-5 model.
    uniform = json.loads(open(manifest['uniform5']['outputs']['levels']).read())
    assert uniform['generations'] == 0 and uniform['levels'] == {'attn': [5] * 4, 'mlp': [5] * 4}
    evaluation = json.loads(open(manifest['eval']['outputs']['report']).read())
    params = {row['method']: row['params'] for row in evaluation['rows']}
    assert params['level6_trained'] < params['level5_trained'] < params['dense']
    assert all(len(row['tasks']) >= 6 for row in evaluation['rows'])
    # lm-eval (HFLM) loaded every model directory, pruned ones through their remote code
    assert all(set(row['lm_eval']) == {'local_arc_easy'} and row['lm_eval']['local_arc_easy']['acc'] in (0, .5, 1)
               for row in evaluation['rows'])
    # held-out perplexity per domain (source file), on documents of the held-out split only
    assert 'redpajama_c4-rp1' in evaluation['heldout_sources']
    assert all(set(row['heldout_by_source']) == set(evaluation['heldout_sources']) for row in evaluation['rows'])
    report = json.loads(open(os.path.join(os.path.dirname(export['report']), 'report.json')).read())
    assert report['sizes']['level6_trained'] == params['level6_trained']
    from safetensors.torch import load_file
    weights = load_file(os.path.join(export['model'], 'model.safetensors'))
    assert sum(t.numel() for t in weights.values()) < params['dense']
    assert all(torch.isfinite(t).all() for t in weights.values())

    # the run wrote only under its run directory (foundry's ICL task copies included)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run', 'tiny.yaml']
    second = run()
    for name in names:
        assert f'stage {name} ({manifest_kind(cfg, name)}): finished earlier, skipped' in second
    assert ': running' not in second


def manifest_kind(cfg, name):
    return next(s['kind'] for s in cfg['stages'] if s['name'] == name)
