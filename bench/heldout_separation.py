"""Are the reproduction's held-out perplexity ratios measured precisely enough? The same models, more text.

The quick reproduction scores held-out perplexity on ``heldout_sequences`` (6; 2 until 2026-12-06) packed
512-token sequences per domain, 40 in all (cc has 4). This bench takes a finished reproduction's models and scores
them on the first ``--seqs`` held-out sequences of every domain (the study's are the first of them; a domain with
less text gives what it has), per sequence, so that every ratio to the
uniform model comes with the standard error of its paired per-sequence log-perplexity differences. Printed for
both the study's sequences and the larger set: overall ratio ± SE, and the ratio per domain. Each model's
per-sequence NLL is saved as it finishes (``--out``), so an interrupted run resumes. LAST line::

    seqs=<per domain> sequences=<all> searched_ratio=<mean over --searched models> se=<SE of that mean>
    searched_ratio_study=<the same on the study's sequences>

    python bench/heldout_separation.py [--run runs/reproduce/quick] [--seqs 8] [--models a,b,..]
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import reproduce

DEFAULT_MODELS = ('uniform5', 'shortgpt5', 'seed0/balanced5', 'seed1/balanced5', 'seed2/balanced5',
                  'seed0/darwinlm5_kl', 'seed1/darwinlm5_kl', 'seed2/darwinlm5_kl', 'seed0/darwinlm5_kl_uniform',
                  'seed0/darwinlm5_kl+train', 'seed1/darwinlm5_kl+train', 'seed2/darwinlm5_kl+train')
SEARCHED = 'seed0/darwinlm5_kl,seed1/darwinlm5_kl,seed2/darwinlm5_kl'


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', default=str(reproduce.REPO / 'runs' / 'reproduce' / 'quick'))
    p.add_argument('--seqs', type=int, default=8, help='held-out sequences per domain (the quick study scores 6)')
    p.add_argument('--models', default=','.join(DEFAULT_MODELS))
    p.add_argument('--searched', default=SEARCHED, help='models averaged in the LAST line')
    p.add_argument('--out', default=None, help='output directory (default <run>/heldout_separation)')
    args = p.parse_args(argv)

    from darwinlm_foundry.utils.io import atomic_write_json

    run = Path(args.run).resolve()
    results = json.loads((run / 'results.json').read_text())
    study = results['budget']['heldout_sequences']
    paths = reproduce.model_paths(results)
    names = args.models.split(',')
    missing = [n for n in names + ['uniform5'] if n not in paths]
    if missing:
        p.error(f'{missing} are not models of {run}; it has {sorted(paths)}')
    if 'uniform5' not in names:
        names.insert(0, 'uniform5')
    fin = reproduce.open_run(run, dataclasses.replace(reproduce.QUICK, heldout_sequences=args.seqs))
    domains = {reproduce.short_domain(d): t for d, t in fin.ctx.heldout().items()}
    out = Path(args.out or run / 'heldout_separation')
    out.mkdir(parents=True, exist_ok=True)
    scorer = None  # the study's scorer: per-sequence NLL, the dense side computed once
    nll = {}
    for name in names:
        cache = out / f'{name.replace("/", "_")}_{args.seqs}.json'
        if cache.is_file():
            nll[name] = json.loads(cache.read_text())['nll']
            continue
        if scorer is None:
            scorer = reproduce.DomainScorer(fin.dense, domains)
        t0 = time.time()
        model = reproduce.load_pruned(paths[name]).eval()
        nll[name] = scorer.score(model)['seq_nll']
        del model
        atomic_write_json(cache, {'model': name, 'path': paths[name], 'nll': nll[name],
                                  'seconds': round(time.time() - t0, 1)})
        print(f'[heldout_separation {time.strftime("%H:%M:%S")}] {name}: {time.time() - t0:.0f} s', flush=True)

    base = nll['uniform5']
    counts = {d: len(v) for d, v in base.items()}
    everything, first = (lambda d, i: True), (lambda d, i: i < study)
    print(f'held-out sequences of 512 tokens per domain: {counts} ({sum(counts.values())} in all); the study scores '
          f'the first {study} of each. Ratio = model / uniform5 perplexity, ± one SE of the paired per-sequence log '
          f'differences, stratified by domain (in brackets: unstratified, which counts the spread between domains '
          f'as noise)')
    dnames = list(base)
    print(f'| model | study\'s {sum(min(c, study) for c in counts.values())} sequences | all '
          f'{sum(counts.values())} | ' + ' | '.join(dnames) + ' |')
    print('|---|---:|---:|' + '---:|' * len(dnames))
    rows = {}
    for name in names:
        (r2, s2, u2) = reproduce.paired_ratio(nll[name], base, first)
        (ra, sa, ua) = reproduce.paired_ratio(nll[name], base, everything)
        per = {d: math.exp(np.mean(nll[name][d]) - np.mean(base[d])) for d in dnames}
        ppl = math.exp(np.mean([x for v in nll[name].values() for x in v]))
        rows[name] = {'study_ratio': r2, 'study_se': s2, 'study_se_unstratified': u2, 'ratio': ra, 'se': sa,
                      'se_unstratified': ua, 'ppl': ppl, 'domains': per}
        print(f'| {name} (ppl {ppl:.1f}) | {r2:.3f} ± {r2 * s2:.3f} ({r2 * u2:.3f}) | {ra:.3f} ± {ra * sa:.3f} '
              f'({ra * ua:.3f}) | '
              + ' | '.join(f'{per[d]:.3f}' for d in dnames) + ' |')
    searched = [n for n in args.searched.split(',') if n in rows]
    summary = {'seqs': args.seqs, 'sequences': sum(counts.values())}
    if searched:
        r = [rows[n]['ratio'] for n in searched]
        summary.update(searched_ratio=round(float(np.mean(r)), 3),
                       se=round(float(np.std(r, ddof=1) / math.sqrt(len(r))) if len(r) > 1 else 0.0, 3),
                       searched_ratio_study=round(float(np.mean([rows[n]['study_ratio'] for n in searched])), 3))
    atomic_write_json(out / f'summary_{args.seqs}.json', {'counts': counts, 'rows': rows, 'summary': summary})
    print(' '.join(f'{k}={v}' for k, v in summary.items()), flush=True)
    return summary


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
