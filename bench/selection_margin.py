"""Do narrow wins in a search's last selection step help? Measured on the histories of searches already run.

For every generation in which an offspring replaced the parent, the margin by which it beat the parent in the last
selection step (the same tokens for both; relative to the parent's fitness) against how the parent's fitness on
the fixed probe sample changed with it. If replacements won by a hair make the probe worse on average, while clear
wins make it better, the last step's sample cannot tell narrow differences apart, and ``search.replace_margin``
(an offspring replaces the parent only when it beats it by more than that fraction) keeps the parent instead.
Reads ``search_state.json`` files (the engine's resumable state, with each generation's step fitnesses and probe
fitness); runs nothing. LAST line::

    searches=<n> replacements=<r> narrow=<k> narrow_probe_delta=<sum> clear_probe_delta=<sum> threshold=<t>

    python bench/selection_margin.py runs/reproduce/full/work/seed*/darwinlm5_kl/search_state.json [--threshold 0.002]
"""

import argparse
import json
import statistics
from pathlib import Path

from darwinlm_foundry.search.selection import PARENT


def replacements(state: dict) -> list[tuple[float, float]]:
    """(relative last-step margin, probe fitness change) of each generation whose parent an offspring replaced."""
    rows, probe = [], state['extra'].get('start_probe_fitness')
    for gen in state['history']:
        if probe is None or gen.get('probe_fitness') is None:
            raise SystemExit('these searches recorded no probe fitness (probe_tokens: 0); nothing to compare against')
        last = gen['steps'][-1]
        fit = dict(zip(last['candidates'], last['fitnesses']))
        if not gen['parent_won']:
            best = min(v for k, v in fit.items() if k != PARENT)
            rows.append(((fit[PARENT] - best) / fit[PARENT], gen['probe_fitness'] - probe))
        probe = gen['probe_fitness']
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('states', nargs='+', help="search_state.json files of KL-only searches with a probe")
    p.add_argument('--threshold', type=float, default=0.002, help='relative margin that separates narrow wins')
    args = p.parse_args(argv)
    total = {'narrow': [], 'clear': []}
    print(f'| search | generations | replacements | narrow (margin <= {args.threshold}) | probe change, narrow | '
          f'probe change, clear | correlation |')
    print('|---|---|---|---|---|---|---|')
    for path in args.states:
        state = json.loads(Path(path).read_text())
        rows = replacements(state)
        narrow = [d for m, d in rows if m <= args.threshold]
        clear = [d for m, d in rows if m > args.threshold]
        total['narrow'] += narrow
        total['clear'] += clear
        corr = statistics.correlation(*zip(*rows)) if len(rows) > 2 else float('nan')
        print(f'| {path} | {len(state["history"])} | {len(rows)} | {len(narrow)} | {sum(narrow):+.4f} | '
              f'{sum(clear):+.4f} | {corr:+.2f} |')
    doc = {'searches': len(args.states), 'replacements': len(total['narrow']) + len(total['clear']),
           'narrow': len(total['narrow']), 'narrow_probe_delta': round(sum(total['narrow']), 4),
           'clear_probe_delta': round(sum(total['clear']), 4), 'threshold': args.threshold}
    print('Probe change: the sum over those generations of the parent\'s probe fitness after minus before (lower '
          'is better); margin: (parent - best offspring) / parent in the last selection step.')
    print(' '.join(f'{k}={v}' for k, v in doc.items()))
    return doc


if __name__ == '__main__':
    main()
