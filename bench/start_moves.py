"""What one large move of the search's start is worth on held-out text: protecting a unit, pruning attention whole.

The search's start (``balance_kinds``, then ``protect_units``) takes moves far larger than a level switch. This bench
scores hand-made variants of a finished reproduction's level-5 start on its held-out domains, every one of exactly
the start's size: the kind-balanced start before protection, the first layer's MLP protected to levels 4, 2 and 0
(its levels spread over the others as ``search.space.protect_unit`` does), and attention pruned in two whole
layers instead of kept dense (15 attention levels = 4 MLP levels given back) for several layer pairs, against the
same 15 levels spread over 15 layers. The configurations are chosen by hand, so this explains the search's
start; it is not a method result.

Needs ``python bench/reproduce.py`` first (its seed-0 level-5 KL-only search must have run with kind balance and
unit protection). LAST line::

    uniform_ppl=<p> start_ratio=<protected start / uniform> balanced_ratio=<before protection> best=<row> best_ratio=<r>

    python bench/start_moves.py [--run runs/reproduce/quick] [--seed 0]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import reproduce


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', default=str(reproduce.REPO / 'runs' / 'reproduce' / 'quick'))
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)

    from darwinlm_foundry.search.space import (LevelConfig, kind_balance_candidates, kind_exchange, protect_unit,
                                               shift_group, uniform)

    t0 = time.time()
    run = Path(args.run).resolve()
    winner = json.loads((run / 'work' / f'seed{args.seed}' / 'darwinlm5_kl' / 'winner.json').read_text())
    if 'unit_protection' not in winner or 'kind_balance' not in winner:
        raise SystemExit(f'{run}: seed {args.seed} searched without kind balance and unit protection; re-run '
                         '`python bench/reproduce.py` with the current defaults')
    fin = reproduce.open_run(run)
    spec = fin.spec
    n = spec.num_layers
    lower, upper = [0] * n, [spec.max_exact_level('mlp')] * n
    start = LevelConfig.from_dict(winner['start'])
    moves = winner['unit_protection']['moves']
    # the kind-balanced start before protection: the winning shift's candidate, as the engine built it
    shift = winner['kind_balance']['shift']
    bounds = fin.bounds(args.seed, 5)
    exchange = kind_exchange(spec.per_step_parameters('attn'), spec.per_step_parameters('mlp'))
    balanced = dict(kind_balance_candidates(uniform(n, 5), bounds, exchange))[shift]

    def protect(config, unit, level):
        mlp = protect_unit(config.mlp, unit, config.mlp[unit] - level, lower, upper)
        return config.replace(mlp=mlp)

    def attention(config, units_levels):
        attn = list(config.attn)
        for unit, level in units_levels:
            attn[unit] = level
        given = sum(attn) - sum(config.attn)
        assert given % exchange[0] == 0, given
        return LevelConfig(attn=attn, mlp=shift_group(config.mlp, -given // exchange[0] * exchange[1], lower, upper))

    variants = [('uniform level 5', uniform(n, 5)), (f'kind balance alone (shift {shift:+d})', balanced)]
    for level in (4, 2, 0):
        variants.append((f'kind balance + layer 0 MLP protected to level {level}', protect(balanced, 0, level)))
    variants.append((f'the search start ({len(moves)} protections: ' + ', '.join(
        f'{m["kind"]} {m["layer"]} -> {m["level"]["to"]}' for m in moves) + ')', start))
    if sum(start.attn) == 0:  # attention dense: try pruning it whole in two layers instead (8 + 7 heads)
        for pair in ((27, 28), (25, 26), (14, 15), (20, 24), (1, 2)):
            variants.append((f'start + attention of layers {pair[0]}, {pair[1]} pruned to 1 and 2 heads',
                             attention(start, [(pair[0], 8), (pair[1], 7)])))
        variants.append(('start + 15 attention levels spread (layers 0, 2, .., 28 at level 1)',
                         attention(start, [(u, 1) for u in range(0, 2 * exchange[0], 2)])))
    size = spec.parameter_count(uniform(n, 5).to_dict())
    rows = []
    for name, config in variants:
        assert spec.parameter_count(config.to_dict()) == size, name
        s = fin.ctx.score(fin.stitch(config))
        rows.append({'name': name, 'ppl': s['ppl'], 'kl': s['kl'], 'levels': config.to_dict(),
                     'domains': len(s['domains'])})
        print(f'[start_moves {time.strftime("%H:%M:%S")}] {name}: held-out ppl {s["ppl"]:.2f}', flush=True)
    uni = rows[0]['ppl']
    print(f'\nLevel 5 ({size:,} parameters, every row), seed {args.seed}\'s start, held-out ppl over '
          f'{rows[0]["domains"]} domains:\n')
    print('| start | held-out ppl | / uniform | KL to dense |')
    print('|---|---|---|---|')
    for r in rows:
        print(f'| {r["name"]} | {r["ppl"]:.2f} | {r["ppl"] / uni:.3f} | {r["kl"]:.4f} |')
    out = run / 'start_moves.json'
    out.write_text(json.dumps({'seed': args.seed, 'rows': rows, 'seconds': round(time.time() - t0, 1)}, indent=1))
    best = min(rows, key=lambda r: r['ppl'])
    searched_start = next(r for r in rows if r['name'].startswith('the search start'))
    print(f'written {out} in {time.time() - t0:.0f} s')
    print(f'uniform_ppl={uni:.2f} start_ratio={searched_start["ppl"] / uni:.3f} '
          f'balanced_ratio={rows[1]["ppl"] / uni:.3f} best={rows.index(best)} best_ratio={best["ppl"] / uni:.3f}')
    return {'rows': rows}


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
