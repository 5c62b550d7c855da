"""How much better than uniform does the SmolLM2 search get with more generations? Measured, one long search.

The quick reproduction runs 5 generations per level-5 search (3 seeds, two selections, on 2 cores); the paper
runs 200. This bench runs ONE KL-only level-5 search of ``--generations`` generations with the quick mode's
budgets (offspring, survivors, fitness tokens; ``--full``: the full run's; ``--set KEY=VALUE`` changes them as in
``reproduce.py``) on a reproduction's database (draw 0's; a run part-way will do), shards and held-out domains,
and scores the parent after the generations in ``--at`` on the held-out text of every domain (the reproduction's
scorer), against the uniform level-5 model.
The search resumes per generation (``--out``/search), so an interrupted run loses at most one generation. Like
the study's searches it starts from the fittest attention/MLP split with its units protected (``balance_kinds``,
``protect_units``; the row ``start``), unless ``--set balance_kinds=false`` (the paper's uniform start);
``--generations 0`` scores that start alone.

Needs ``python bench/reproduce.py`` first (its ``quick`` directory is the default ``--run``). LAST line::

    generations=<G> uniform_ppl=<u> ratio_at_<g>=<searched ppl / uniform ppl> ... probe_kl_start=<k> probe_kl_end=<k>

    python bench/search_length.py [--run runs/reproduce/quick] [--generations 30] [--at 5,10,20,30] [--seed 0]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import reproduce  # the study's budgets, search call and per-domain held-out scorer (bench/reproduce.py)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', default=str(reproduce.REPO / 'runs' / 'reproduce' / 'quick'),
                   help='a finished reproduction directory')
    p.add_argument('--generations', type=int, default=30)
    p.add_argument('--at', default='5,10,20,30', help='generations after which the parent is scored held-out')
    p.add_argument('--level', type=int, default=5)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--tas', action='store_true', help='training-aware selection (the TAS arm) instead of KL-only')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='a budget override')
    p.add_argument('--full', action='store_true', help="the full budget's settings (offspring, survivors, fitness "
                   'tokens, held-out sample) instead of the quick ones, e.g. on the full run')
    p.add_argument('--out', default=None, help='output directory (default <run>/search_length)')
    p.add_argument('--start', default=None, help="start from these levels (another search's winner.json) instead "
                   'of uniform; held-out ratios stay relative to the uniform model')
    args = p.parse_args(argv)
    at = sorted({g for g in map(int, args.at.split(',')) if 0 < g <= args.generations}
                | ({args.generations} if args.generations else set()))

    from darwinlm_foundry.search.space import uniform

    t0 = time.time()
    run = Path(args.run).resolve()
    out = Path(args.out or run / 'search_length').resolve()
    out.mkdir(parents=True, exist_ok=True)
    fin = reproduce.open_run(run, reproduce._override(reproduce.FULL if args.full else reproduce.QUICK, args.set), out)
    found = fin.search(out / 'search', args.seed, tas=args.tas, level=None if args.start else args.level,
                       generations=args.generations, start=args.start, extra_levels=0)
    budget = fin.ctx.budget
    parents = {0: uniform(fin.spec.num_layers, args.level, mlp_split=fin.spec.mlp_split).to_dict()}
    if args.start or found['kind_balance']:  # the row 'start': the given levels or the balanced start
        parents['start'] = found['start']
    parents.update({g: found['parents'][g - 1] for g in at})
    if found['parents'] and found['levels'] != found['parents'][-1]:  # what it returns, by its winner rule
        parents['winner'] = found['levels']
    rows = []
    for g, levels in parents.items():
        s = fin.ctx.score(fin.stitch(levels))
        probe = found['probe_fitness_history'][g - 1] if isinstance(g, int) and g else (
            None if g == 0 and 'start' in parents else
            found['probe_fitness'] if g == 'winner' else found['start_probe_fitness'])
        rows.append({'generation': g, 'ppl': s['ppl'], 'kl': s['kl'], 'params': s['params'],
                     'domains': {reproduce.short_domain(d): v['ppl'] for d, v in s['domains'].items()},
                     'probe_kl': probe, 'levels': levels})
    base = rows[0]['ppl']
    doc = {'run': str(run), 'level': args.level, 'seed': args.seed, 'generations': args.generations,
           'budget': budget.describe(), 'search_seconds': found['seconds'], 'seconds': round(time.time() - t0, 1),
           'winner_rule': found['winner_rule'], 'winner_generation': found['winner_generation'],
           'rows': rows}
    (out / 'search_length.json').write_text(json.dumps(doc, indent=1))
    names = list(rows[0]['domains'])
    print(f'{"TAS" if args.tas else "KL-only"} level-{args.level} search, seed {args.seed}: {budget.offspring} offspring, '
          f'survivors {list(budget.survivors)}, fitness tokens {list(budget.fitness_tokens)}'
          f'{", samples balanced by source" if budget.samples_by_source else ""}, <= {budget.max_switches} switches; '
          f'{found["seconds"]:.0f} s of search')
    print('| generations | held-out ppl | / uniform | KL to dense | parent probe KL | ' + ' | '.join(names) + ' |')
    print('|---|---|---|---|---|' + '---|' * len(names))
    for r in rows:
        label = (f'winner ({found["winner_rule"]}: generation {found["winner_generation"]})'
                 if r['generation'] == 'winner' else r['generation'])
        print(f'| {label} | {r["ppl"]:.2f} | {r["ppl"] / base:.3f} | {r["kl"]:.4f} | '
              f'{r["probe_kl"] if r["probe_kl"] is None else round(r["probe_kl"], 4)} | '
              + ' | '.join(f'{r["domains"][d]:.1f}' for d in names) + ' |')
    print(f'written {out / "search_length.json"} in {doc["seconds"]:.0f} s')
    probe = [r['probe_kl'] for r in rows if r['probe_kl'] is not None and r['generation'] != 'winner']
    print(f'generations={args.generations} uniform_ppl={base:.2f} '
          + ' '.join(f'ratio_at_{r["generation"]}={r["ppl"] / base:.3f}' for r in rows[1:])
          + (f' probe_kl_start={probe[0]:.4f} probe_kl_end={probe[-1]:.4f}' if probe else ''), flush=True)
    return doc


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
