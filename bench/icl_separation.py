"""Can ICL accuracy separate the reproduction's arms? The same models, scored on many more examples.

The quick reproduction scores ICL on the package's embedded task files (100 examples per task: a standard error
of about 0.05, wider than the differences between the level-5 arms). This bench takes a finished reproduction's
models and scores them with the same foundry evaluator on the first ``--limit`` examples of each task in
``--icl-dir`` (default: the full local task files in ``../shared/data/icl``: 2,376 arc_easy, 1,838 piqa), and
reports every model's accuracy with its binomial standard error, the difference to the uniform model with the
(unpaired, so conservative) standard error of the difference, and chance. Each model's result is saved as it
finishes (``--out``), so an interrupted run resumes. LAST line::

    examples=<per task> searched_minus_uniform=<mean acc difference> se=<its se> z=<ratio> dense_minus_uniform=<d>

    python bench/icl_separation.py [--run runs/reproduce/quick] [--limit 1000] [--tasks arc_easy,piqa]
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import reproduce  # the reproduction's ICL row (accuracy and binomial SE per task and for the mean)

REPO = reproduce.REPO
DEFAULT_MODELS = ('dense', 'uniform5', 'shortgpt5', 'seed0/darwinlm5_kl', 'seed0/darwinlm5_kl+train')


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', default=str(REPO / 'runs' / 'reproduce' / 'quick'))
    p.add_argument('--icl-dir', default=str(REPO.parent / 'shared' / 'data' / 'icl'))
    p.add_argument('--limit', type=int, default=1000, help='examples per task (the first ones of each file)')
    p.add_argument('--tasks', default='arc_easy,piqa')
    p.add_argument('--models', default=','.join(DEFAULT_MODELS))
    p.add_argument('--searched', default='seed0/darwinlm5_kl', help='the arm compared with uniform5 in the LAST line')
    p.add_argument('--out', default=None, help='output directory (default <run>/icl_separation)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: every core)')
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from darwinlm_foundry.eval.icl import LOCAL_TASKS, available_tasks, run_icl_eval
    from darwinlm_foundry.utils.io import atomic_write_json
    from darwinlm_foundry.utils.logging import quiet

    run = Path(args.run).resolve()
    results = json.loads((run / 'results.json').read_text())
    paths = reproduce.model_paths(results)
    names = args.models.split(',')
    missing = [n for n in names if n not in paths]
    if missing:
        p.error(f'{missing} are not models of {run}; it has {sorted(paths)}')
    icl_dir = Path(args.icl_dir)
    tasks = available_tasks(icl_dir, [t for t in LOCAL_TASKS if t.label in args.tasks.split(',')])
    if not tasks:
        p.error(f'none of the tasks {args.tasks} has a file in {icl_dir}')
    counts = reproduce.icl_counts(icl_dir, tasks, args.limit)
    out = Path(args.out or run / 'icl_separation')
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(paths['dense'])
    accs = {}
    for name in names:
        cache = out / f'{name.replace("/", "_")}_{args.limit}.json'
        if cache.is_file():
            accs[name] = json.loads(cache.read_text())['tasks']
            continue
        t0 = time.time()
        with quiet('composer', 'llmfoundry', 'streaming', 'transformers'):
            r = run_icl_eval(paths[name], tokenizer, icl_dir, tasks, limit=args.limit, device_eval_batch_size=8,
                             max_seq_len=2048, device='cpu', progress=False,
                             num_threads=args.threads)
        accs[name] = r.tasks
        atomic_write_json(cache, {'model': name, 'path': paths[name], 'tasks': r.tasks, 'examples': counts,
                                  'seconds': round(time.time() - t0, 1)})
        print(f'{name}: ' + ', '.join(f'{t} {a:.3f}' for t, a in r.tasks.items()) + f' ({time.time() - t0:.0f} s)',
              flush=True)

    rows = {name: reproduce._icl_row(accs[name], counts) for name in names}  # per-task and mean acc with SE

    chance = {t.key: t.random_baseline for t in tasks}
    keys = list(counts)
    print(f'examples per task: {counts}; chance: {chance}; source: {icl_dir}')
    print('| model | ' + ' | '.join(keys) + ' | mean | mean - uniform (se) |')
    print('|---|' + '---:|' * (len(keys) + 2))
    u, use = (rows['uniform5']['mean'], rows['uniform5']['mean_se']) if 'uniform5' in rows else (None, None)
    for name in names:
        r = rows[name]
        diff = '-' if u is None or name == 'uniform5' else \
            f'{r["mean"] - u:+.3f} ({math.hypot(r["mean_se"], use):.3f})'
        print(f'| {name} | ' + ' | '.join(f'{r["tasks"][t]["acc"]:.3f} ± {r["tasks"][t]["se"]:.3f}' for t in keys)
              + f' | {r["mean"]:.3f} ± {r["mean_se"]:.3f} | {diff} |')
    summary = {'examples': min(counts.values())}
    if u is not None and args.searched in rows:
        s, d_se = rows[args.searched]['mean'], math.hypot(rows[args.searched]['mean_se'], use)
        summary.update(searched_minus_uniform=round(s - u, 4), se=round(d_se, 4), z=round((s - u) / d_se, 2))
    if u is not None and 'dense' in rows:
        summary['dense_minus_uniform'] = round(rows['dense']['mean'] - u, 4)
    atomic_write_json(out / f'summary_{args.limit}.json', {'accuracy': accs, 'examples': counts, 'chance': chance,
                                                           'summary': summary})
    print(' '.join(f'{k}={v}' for k, v in summary.items()))
    return summary


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
