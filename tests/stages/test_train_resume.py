"""A train stage killed mid-run resumes from its Composer checkpoint and ends with the same weights."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml
from conftest import COMPOSER, REPO, tiny_model

def write_run(tmp_path, name, model_dir, shards):
    cfg = {'run_dir': str(tmp_path / name), 'seed': 3, 'stages': [
        {'name': 'data', 'kind': 'data', 'shards': str(shards)},
        {'name': 'dense', 'kind': 'model', 'path': str(model_dir)},
        {'name': 'train', 'kind': 'train', 'model': 'dense', 'data': 'data', 'train': {
            'max_seq_len': 64, 'max_duration': '40ba', 'global_train_batch_size': 2, 'device_train_batch_size': 2,
            'device_train_microbatch_size': 2, 'device_eval_batch_size': 2, 'precision': 'fp32',
            'model': {'name': 'darwinlm', 'pretrained': True, 'use_train_metrics': False},
            'optimizer': {'name': 'decoupled_adamw', 'lr': 1e-3, 'weight_decay': 0.0},
            'scheduler': {'name': 'cosine_with_warmup', 't_warmup': '1ba'},
            'save_interval': '10ba', 'progress_bar': False, 'log_to_console': False, 'python_log_level': None}},
    ]}
    path = tmp_path / f'{name}.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(yaml_path, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    log = open(tmp_path / f'{yaml_path.stem}.log', 'ab')
    return subprocess.Popen([COMPOSER, '-n', '1', str(REPO / 'train.py'), str(yaml_path)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def final_weights(run_dir):
    from safetensors.torch import load_file
    model_dir = os.path.join(run_dir, 'train', 'model')
    files = [f for f in os.listdir(model_dir) if f.endswith('.safetensors')]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(model_dir, f)))
    return out


@pytest.mark.slow(seconds=120)
@pytest.mark.timeout(900)
def test_killed_train_stage_resumes_to_same_weights(tmp_path, wiki_shards, llama2_tokenizer):
    model_dir = tmp_path / 'dense'
    tiny_model('llama_gqa', vocab_size=32000, hidden_size=32, head_dim=8, intermediate_size=64,
               num_hidden_layers=2).save_pretrained(model_dir)
    llama2_tokenizer.save_pretrained(model_dir)

    straight = write_run(tmp_path, 'straight', model_dir, wiki_shards)
    assert launch(straight, tmp_path).wait(timeout=600) == 0, (tmp_path / 'straight.log').read_text()[-3000:]

    killed = write_run(tmp_path, 'killed', model_dir, wiki_shards)
    proc = launch(killed, tmp_path)
    ckpt_dir = tmp_path / 'killed' / 'train' / 'checkpoints'
    deadline = time.time() + 600
    latest = ckpt_dir / 'latest-rank0.pt'
    # Kill as soon as the first checkpoint is complete (Composer points `latest` at it after writing it).
    while not (latest.is_symlink() and 'ba10' in os.readlink(latest)):
        assert proc.poll() is None, 'run ended before its first checkpoint: ' + \
            (tmp_path / 'killed.log').read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((tmp_path / 'killed' / 'stages.json').read_text())['stages']
    assert 'train' not in manifest  # the stage did not finish
    assert launch(killed, tmp_path).wait(timeout=600) == 0, (tmp_path / 'killed.log').read_text()[-3000:]
    log = (tmp_path / 'killed.log').read_text()
    assert 'stage data (data): finished earlier, skipped' in log

    a, b = final_weights(tmp_path / 'straight'), final_weights(tmp_path / 'killed')
    assert a.keys() == b.keys()

    # Killed after the final Composer checkpoint but before the stage's export and record: the re-run
    # exports the finished checkpoint instead of asking foundry to resume a finished run.
    run_dir = tmp_path / 'straight'
    shutil.rmtree(run_dir / 'train' / 'model')
    shutil.rmtree(run_dir / 'train' / 'export')
    manifest = json.loads((run_dir / 'stages.json').read_text())
    del manifest['stages']['train']
    (run_dir / 'stages.json').write_text(json.dumps(manifest))
    assert launch(straight, tmp_path).wait(timeout=600) == 0, (tmp_path / 'straight.log').read_text()[-3000:]
    again = final_weights(run_dir)
    for name in a:
        torch.testing.assert_close(again[name], a[name], rtol=0, atol=0, msg=name)

    from safetensors.torch import load_file
    start = load_file(str(model_dir / 'model.safetensors'))
    assert any(not torch.equal(a[n], start[n]) for n in a if n in start)  # training moved the weights
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
