"""The shipped tiny chain end to end (smallest settings) under Composer's launcher, then re-run: all skipped."""

import importlib.util
import json
import os
import random
import subprocess

import pytest
import torch
import yaml
from conftest import COMPOSER, REPO

from darwinlm_foundry.stages.chain import load_run_yaml


def _bench(name):
    """A bench script's functions (the kill loop and the chain's smallest budgets live there, used by both)."""
    spec = importlib.util.spec_from_file_location(name, REPO / 'bench' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KILL = _bench('kill_resume')
smallest = KILL.smallest_tiny_chain


@pytest.mark.slow(seconds=500)
@pytest.mark.timeout(2700)
def test_tiny_chain_end_to_end_then_skipped(tmp_path):
    cfg = smallest(load_run_yaml(str(REPO / 'yamls' / 'darwinlm_tiny.yaml')), tmp_path / 'run')
    path = tmp_path / 'tiny.yaml'
    path.write_text(yaml.safe_dump(cfg))

    def run():
        # run from the checkout, as the README's demo command does: nothing may land there (see below)
        out = subprocess.run([COMPOSER, '-n', '1', str(REPO / 'train.py'), str(path)], cwd=REPO,
                             capture_output=True, text=True, timeout=1200, env=dict(os.environ, PYTHONUNBUFFERED='1'))
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        return out.stdout + out.stderr

    tree_before = _git_status()
    first = run()
    assert _git_status() == tree_before, 'the chain wrote into the source tree (git status changed)'
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

    # kill -9 once in every stage kind (a random moment, 0.2-2 s into the stage), re-run the same command each
    # time: the finished run equals the uninterrupted one (database bytes, winners, weights, metrics)
    cfg['run_dir'] = str(tmp_path / 'killed')
    killed_yaml = tmp_path / 'killed.yaml'
    killed_yaml.write_text(yaml.safe_dump(cfg))
    done = KILL.run_with_kills(killed_yaml, tmp_path, KILL.KINDS, random.Random(0), max_delay=2.0,
                               log=tmp_path / 'killed.log')
    landed = [kind for kind, _, killed in done if killed]
    assert len(landed) >= len(KILL.KINDS) - 1, done  # a very short stage (export) may end before its kill
    assert KILL.compare_runs(tmp_path / 'run', tmp_path / 'killed') == []


def _git_status():
    """Untracked and modified files of the checkout (None outside a git checkout, e.g. an installed sdist)."""
    out = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all'], cwd=REPO, capture_output=True,
                         text=True)
    return sorted(out.stdout.splitlines()) if out.returncode == 0 else None


def manifest_kind(cfg, name):
    return next(s['kind'] for s in cfg['stages'] if s['name'] == name)
