"""Does the split of a pruning budget between attention and MLP matter? Measured on held-out text.

The search's level switches move a level between two units of the same kind, so the attention and MLP level sums
(how much of the cut falls on attention) stay those of its start. ``balance_kinds`` lets a search start from
the fittest of the starts that move whole exchanges of equal parameter cost between the kinds
(``search.space.kind_balance_candidates``; SmolLM2-135M: 15 attention levels = 4 MLP levels), chosen on the
search's own tokens. This bench scores every such start of the uniform level-``--level`` model (all of exactly its
parameter count) on a finished reproduction's held-out domains: how much the split alone is worth, and whether
the choice made on search tokens is the one held-out text prefers.

How reliable is that choice? For every seed in ``--seeds`` and sample size in ``--balance-tokens`` the bench also
makes the choice as a search of that seed would (the search's own balance sample, ``search.engine.balance_kinds``)
and reports the held-out ratio of the start it picks.

Needs ``python bench/reproduce.py`` first (its ``quick`` directory is the default ``--run``). LAST line::

    uniform_ppl=<p> best_shift=<k> best_ratio=<best / uniform> choice_<tokens>=<mean held-out ratio of the picks> ...

    python bench/kind_balance.py [--run runs/reproduce/quick] [--level 5] [--seeds 0,1,2,3,4] [--balance-tokens 2048]
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
    p.add_argument('--seeds', default='0,1,2,3,4', help='seeds whose balance samples make the choice')
    p.add_argument('--balance-tokens', default='2048', help='sample sizes of the choice (comma list)')
    p.add_argument('--rows-from', default=None,
                   help="an earlier run's JSON: reuse its held-out rows (the same run), score only the choices")
    p.add_argument('--out', default=None, help='output JSON (default <run>/kind_balance.json)')
    args = p.parse_args(argv)

    from darwinlm_foundry.search.space import kind_balance_candidates, kind_exchange, uniform

    t0 = time.time()
    run = Path(args.run).resolve()
    fin = reproduce.open_run(run)
    spec = fin.spec
    n = spec.num_layers
    exchange = kind_exchange(spec.per_step_parameters('attn'), spec.per_step_parameters('mlp'))
    start = uniform(n, args.level, mlp_split=spec.mlp_split)
    bounds = fin.bounds(0, args.level)
    rows = json.loads(Path(args.rows_from).read_text())['rows'] if args.rows_from else []
    for shift, config in [] if rows else kind_balance_candidates(start, bounds, exchange):
        s = fin.ctx.score(fin.stitch(config))
        assert s['params'] == spec.parameter_count(start.to_dict()), s['params']
        rows.append({'shift': shift, 'attn_levels': sum(config.attn), 'mlp_levels': sum(config.mlp),
                     'ppl': s['ppl'], 'kl': s['kl'], 'params': s['params'], 'levels': config.to_dict(),
                     'domains': {reproduce.short_domain(d): v['ppl'] for d, v in s['domains'].items()}})
        print(f'[kind_balance {time.strftime("%H:%M:%S")}] shift {shift:+d}: attention level sum {sum(config.attn)}, '
              f'MLP {sum(config.mlp)}: held-out ppl {s["ppl"]:.2f}, KL {s["kl"]:.4f}', flush=True)
    uni = next(r for r in rows if r['shift'] == 0)
    best = min(rows, key=lambda r: r['ppl'])
    ratio = {r['shift']: r['ppl'] / uni['ppl'] for r in rows}
    # the choice as the study's level-5 KL-only search of each seed makes it, per sample size
    choices = {}
    for n_tokens in [int(t) for t in args.balance_tokens.split(',')]:
        ctx = dataclasses.replace(fin.ctx, budget=dataclasses.replace(reproduce.QUICK, balance_tokens=n_tokens))
        for seed in [int(x) for x in args.seeds.split(',')]:
            with tempfile.TemporaryDirectory() as tmp:
                search = reproduce.search_engine(ctx, fin.db, fin.dense_dir, Path(tmp), seed, tas=False,
                                                 level=args.level, generations=0)
                _, record = search.balance_kinds(search.start)
            choices.setdefault(str(n_tokens), []).append(
                {'seed': seed, 'shift': record['shift'], 'heldout_ratio': ratio[record['shift']],
                 'fitness': {c['shift']: c['fitness'] for c in record['candidates']}})
    names = list(rows[0]['domains'])
    doc = {'run': str(run), 'level': args.level, 'params': uni['params'], 'exchange': exchange,
           'choices': choices, 'seconds': round(time.time() - t0, 1), 'rows': rows}
    out = Path(args.out or run / 'kind_balance.json')
    out.write_text(json.dumps(doc, indent=1))
    print(f'Level {args.level} ({uni["params"]:,} parameters), {n} layers; one exchange = {exchange[0]} attention '
          f'levels for {exchange[1]} MLP levels; shift k > 0 prunes attention more (levels spread evenly)')
    print('| shift | attention level sum | heads kept (of 9 per layer, mean) | MLP level sum | held-out ppl | '
          '/ uniform | KL | ' + ' | '.join(names) + ' |')
    print('|---|---|---|---|---|---|---|' + '---|' * len(names))
    for r in rows:
        heads = sum(spec.keep('attn', lvl) for lvl in r['levels']['attn']) / n
        print(f'| {r["shift"]:+d} | {r["attn_levels"]} | {heads:.2f} | {r["mlp_levels"]} | {r["ppl"]:.2f} | '
              f'{r["ppl"] / uni["ppl"]:.3f} | {r["kl"]:.4f} | ' + ' | '.join(f'{r["domains"][d]:.1f}' for d in names)
              + ' |')
    print()
    print('The choice a search makes on its own balance sample (per seed: the shift picked, its held-out ratio):')
    first = next(iter(choices.values()))
    print('| balance tokens | ' + ' | '.join(f'seed {c["seed"]}' for c in first) + ' | mean ratio |')
    print('|---|' + '---|' * (len(first) + 1))
    for n_tokens, picks in choices.items():
        print(f'| {n_tokens} | ' + ' | '.join(f'{c["shift"]:+d} ({c["heldout_ratio"]:.3f})' for c in picks)
              + f' | {sum(c["heldout_ratio"] for c in picks) / len(picks):.3f} |')
    print(f'written {out} in {doc["seconds"]:.0f} s')
    print(f'uniform_ppl={uni["ppl"]:.2f} best_shift={best["shift"]} best_ratio={best["ppl"] / uni["ppl"]:.3f} '
          + ' '.join(f'choice_{n}={sum(c["heldout_ratio"] for c in picks) / len(picks):.3f}'
                     for n, picks in choices.items()), flush=True)
    return doc


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
