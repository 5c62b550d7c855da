"""Kind balance and unit protection chosen together: does it change a search's start, and is that better held-out?

A search's start is made in two steps on one fixed sample (``search.engine``): the fittest attention/MLP split
(``balance_kinds``), then up to ``protect_units`` one-unit protections of that split. The split is chosen before
its protection, so a split that protects well (the one unit worth protecting, layer 0's MLP, sits higher with
attention dense) can lose to one that only looks better unprotected. This bench makes the start both ways per seed:
as the search does, and jointly (each of the ``--top`` fittest splits protected, the fittest result kept), and scores
the starts on a finished reproduction's held-out text (``--heldout-sequences`` per domain).

Needs ``python bench/reproduce.py`` first (its ``quick`` directory is the default ``--run``). LAST line::

    search_ratio=<mean held-out ratio to uniform of the starts as the search makes them> joint_ratio=<jointly>

    python bench/joint_start.py [--run runs/reproduce/quick] [--seeds 0,1,2] [--top 2] [--balance-tokens 4096]
"""

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import reproduce


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', default=str(reproduce.REPO / 'runs' / 'reproduce' / 'quick'))
    p.add_argument('--level', type=int, default=5)
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--top', type=int, default=2, help='the fittest splits protected before the joint choice')
    p.add_argument('--balance-tokens', type=int, default=4096)
    p.add_argument('--heldout-sequences', type=int, default=8, help='per domain')
    p.add_argument('--out', default=None, help='output JSON (default <run>/joint_start.json)')
    args = p.parse_args(argv)

    from darwinlm_foundry.search.space import uniform
    from darwinlm_foundry.utils.io import atomic_write_json

    t0 = time.time()
    run = Path(args.run).resolve()
    budget = dataclasses.replace(reproduce.QUICK, balance_tokens=args.balance_tokens,
                                 heldout_sequences=args.heldout_sequences)
    fin = reproduce.open_run(run, budget=budget)
    spec = fin.spec
    uniform_config = uniform(spec.num_layers, args.level, mlp_split=spec.mlp_split)
    scores = {}
    out = Path(args.out or run / 'joint_start.json')

    def heldout(config) -> dict:
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in scores:
            scores[key] = fin.ctx.score(fin.stitch(config))
        return scores[key]

    uni = heldout(uniform_config)
    print(f'[joint_start] uniform level {args.level}: held-out ppl {uni["ppl"]:.2f}', flush=True)
    seeds = []
    for seed in [int(x) for x in args.seeds.split(',')]:
        with tempfile.TemporaryDirectory() as tmp:
            engine = reproduce.search_engine(fin.ctx, fin.db, fin.dense_dir, Path(tmp), seed, tas=False,
                                             level=args.level, generations=0)
            tokens = engine.balance_sample()
            _, record = engine.balance_kinds(engine.start, tokens)
            splits = dict(engine.kind_splits(engine.start)[1])
            fitness = {c['shift']: c['fitness'] for c in record['candidates']}
            # the search's own order (ties to the smaller shift), so the first is the split it picks
            top = sorted(fitness, key=lambda shift: (fitness[shift], abs(shift)))[:args.top]
            assert top[0] == record['shift'], (top, record['shift'])
            rows = []
            for shift in top:
                config, protection = engine.protect_units(splits[shift], tokens, fitness[shift])
                s = heldout(config)
                rows.append({'shift': shift, 'split_fitness': fitness[shift], 'fitness': protection['fitness'],
                             'moves': protection['moves'], 'ppl': s['ppl'], 'ratio': s['ppl'] / uni['ppl'],
                             'levels': config.to_dict()})
                print(f'[joint_start {time.strftime("%H:%M:%S")}] seed {seed} shift {shift:+d}: split fitness '
                      f'{fitness[shift]:.4f}, protected {protection["fitness"]:.4f}; held-out {s["ppl"]:.2f} '
                      f'({rows[-1]["ratio"]:.3f})', flush=True)
        joint = min(rows, key=lambda r: r['fitness'])
        seeds.append({'seed': seed, 'search_shift': top[0], 'search_ratio': rows[0]['ratio'],
                      'joint_shift': joint['shift'], 'joint_ratio': joint['ratio'], 'rows': rows})
        doc = {'run': str(run), 'level': args.level, 'top': args.top, 'balance_tokens': args.balance_tokens,
               'heldout_sequences': args.heldout_sequences, 'uniform_ppl': uni['ppl'], 'seeds': seeds,
               'seconds': round(time.time() - t0, 1)}
        atomic_write_json(out, doc, indent=1)  # after every seed: a stopped run keeps the seeds it finished
    print(f'Level {args.level} starts, held-out ratio to uniform ({args.heldout_sequences} sequences per domain); '
          f'kind balance and protection on {args.balance_tokens} tokens of each seed\'s sample, the {args.top} '
          'fittest splits protected for the joint choice')
    print('| seed | split, then protection (the search) | jointly | fitness of each: ' +
          ' / '.join('split (protected)' for _ in range(args.top)) + ' |')
    print('|---|---|---|---|')
    for s in seeds:
        print(f'| {s["seed"]} | {s["search_shift"]:+d}: {s["search_ratio"]:.3f} | {s["joint_shift"]:+d}: '
              f'{s["joint_ratio"]:.3f} | ' + ', '.join(f'{r["shift"]:+d}: {r["split_fitness"]:.4f} '
                                                   f'({r["fitness"]:.4f})' for r in s['rows']) + ' |')
    mean = lambda key: sum(s[key] for s in seeds) / len(seeds)  # noqa: E731
    print(f'written {out} in {doc["seconds"]:.0f} s')
    print(f'search_ratio={mean("search_ratio"):.3f} joint_ratio={mean("joint_ratio"):.3f}', flush=True)
    return doc


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
