"""bench/reproduce.py at its smoke budget: every method runs, sizes match, re-running resumes from the ledger.

The numbers of a 6-step pretraining mean nothing; what is checked is the bookkeeping the study rests on
(equal budgets, post-training that changes the models, models saved, the last line's format) and that it resumes.
"""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / 'shared' / 'data' / 'redpajama_sample'
LAST_LINE = re.compile(r'^searched_vs_uniform_ppl_ratio=(\S+) tas_gain=(\S+) gradual_gain=(\S+)$')


def _run(out: Path):
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'reproduce.py'), '--smoke', '--out', str(out),
                           '--data', str(DATA)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(1200)
@pytest.mark.skipif(not DATA.is_dir(), reason='needs ../shared/data beside the repository')
def test_reproduce_smoke_and_resume(tmp_path):
    out = tmp_path / 'smoke'
    stdout = _run(out)
    last = stdout.strip().splitlines()[-1]
    match = LAST_LINE.match(last)
    assert match, last
    assert all(float(x) > 0 for x in match.groups())

    doc = json.loads((out / 'results.json').read_text())
    v = doc['variants']['mha']
    models = v['seeds']['0']['models']
    hidden = 160
    for level in (5, 6):
        same = {models[k]['params'] for k in (f'uniform{level}', f'magnitude{level}', f'ziplm{level}')}
        assert len(same) == 1, (level, same)
        # layer dropping removes whole layers, norms included: smaller by exactly two norms per dropped layer
        dropped = sum(1 for lv in models[f'shortgpt{level}']['levels']['attn'] if lv == 10)
        assert dropped == 4 * level // 10
        assert models[f'uniform{level}']['params'] - models[f'shortgpt{level}']['params'] == dropped * 2 * hidden
    for k in ('darwinlm5_kl', 'darwinlm5_tas', 'darwinlm5_kl+train', 'darwinlm5_tas+train'):
        assert models[k]['params'] == models['uniform5']['params'], k
    for k in ('darwinlm6', 'darwinlm6+train2N', 'gradual6', 'gradual6+train'):
        assert models[k]['params'] == models['uniform6']['params'], k
    # post-training changed the models (a silent no-op fit would make comparison 8 and 9 meaningless)
    for k in ('darwinlm5_kl', 'darwinlm5_tas', 'gradual6'):
        trained = models[f'{k}+train']
        assert trained['ppl'] != models[k]['ppl'], k
    assert models['darwinlm6+train2N']['ppl'] != models['darwinlm6']['ppl']
    # every model is a loadable HF directory; the dense model scores KL 0 against itself
    for m in models.values():
        assert (Path(m['path']) / 'config.json').is_file() and (Path(m['path']) / 'model.safetensors').is_file()
    assert v['dense_scores']['kl'] == pytest.approx(0.0, abs=1e-6)
    assert (out / 'results.md').read_text().strip().splitlines()[-1] == last
    assert all(Path(p).is_file() for p in doc['plots'])

    # resume: a second run finds every step in the ledger and prints the same result
    again = _run(out)
    assert again.strip().splitlines()[-1] == last
    assert 'done in' not in again


def _load_reproduce():
    spec = importlib.util.spec_from_file_location('reproduce', REPO / 'bench' / 'reproduce.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_ngram_reference_matches_counting_by_hand():
    rng = np.random.default_rng(0)
    vocab = 7
    # skewed draws so unigram and bigram differ; token 6 never occurs in train (add-0.5 must cover it)
    train, search, held = (rng.choice(6, size=(n, 9), p=[.4, .2, .15, .1, .1, .05]) for n in (30, 6, 5))
    held[0, 3] = 6
    got = _load_reproduce().ngram_reference(train, search, held, vocab)

    uni = [(sum(int(t == v) for t in train.ravel()) + 0.5) / (train.size + 0.5 * vocab) for v in range(vocab)]
    pairs, ctx = {}, [0] * vocab
    for row in train.tolist():
        for a, b in zip(row, row[1:]):
            pairs[a, b] = pairs.get((a, b), 0) + 1
            ctx[a] += 1

    def ppl(tokens, lam):
        logs = [math.log(lam * (pairs.get((a, b), 0) / ctx[a] if ctx[a] else 0.0) + (1 - lam) * uni[b])
                for row in tokens.tolist() for a, b in zip(row, row[1:])]
        return math.exp(-sum(logs) / len(logs))

    lam = min((i / 10 for i in range(1, 10)), key=lambda x: ppl(search, x))
    assert got['bigram_lambda'] == lam
    assert got['unigram_ppl'] == pytest.approx(ppl(held, 0.0), rel=1e-12)
    assert got['bigram_ppl'] == pytest.approx(ppl(held, lam), rel=1e-12)
    assert got['train_tokens'] == train.size
