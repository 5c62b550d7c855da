"""fp32 against bf16 autocast for the SmolLM2 search on a CPU, side by side: time, winners, probe fitness.

A CPU with AMX tiles (Intel Sapphire Rapids and later) runs bf16 matmuls several times faster than fp32;
``SearchSettings.precision='amp_bf16'`` autocasts the candidates' forwards and TAS fits to bf16 there while the
dense targets, the KL and every held-out score stay fp32. This bench runs the same level-5 search (the quick
reproduction's budgets, ``--set`` as in ``reproduce.py``) twice on a finished reproduction's database, once per
precision, and compares the time, the parent after every generation and the parent's fitness on the fixed probe
sample. LAST line::

    generations=<G> selection=<kl|tas> fp32_s=<s> bf16_s=<s> speedup=<fp32_s / bf16_s> same_parents=<k>/<G> probe_kl_max_rel_diff=<d>

    python bench/search_precision.py [--run runs/reproduce/quick] [--generations 3] [--tas]
"""

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import reproduce  # the study's budgets and search call (bench/reproduce.py)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', default=str(reproduce.REPO / 'runs' / 'reproduce' / 'quick'),
                   help='a finished reproduction directory')
    p.add_argument('--generations', type=int, default=3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--tas', action='store_true', help='training-aware selection (fits under autocast too)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='a quick-budget override')
    p.add_argument('--out', default=None, help='output directory (default <run>/search_precision)')
    args = p.parse_args(argv)
    if not reproduce.fast_bf16_cpu():
        print('note: this CPU has neither AMX tiles nor AVX512-BF16; bf16 autocast may be slower than fp32 here',
              flush=True)

    run = Path(args.run).resolve()
    out = Path(args.out or run / 'search_precision').resolve()
    fin = reproduce.open_run(run, out=out)
    found = {}
    for precision in ('fp32', 'amp_bf16'):
        budget = reproduce._override(reproduce.QUICK, args.set + [f'search_precision={precision}'])
        ctx = dataclasses.replace(fin.ctx, budget=budget)
        work = out / precision
        shutil.rmtree(work, ignore_errors=True)  # timed from scratch, never resumed
        t0 = time.time()
        found[precision] = reproduce.search(ctx, fin.db, fin.dense_dir, work, args.seed, tas=args.tas, level=5,
                                            generations=args.generations)
        print(f'{precision}: {time.time() - t0:.1f} s', flush=True)
    a, b = found['fp32'], found['amp_bf16']
    same = sum(x == y for x, y in zip(a['parents'], b['parents']))
    probes = [(x, y) for x, y in zip([a['start_probe_fitness']] + a['probe_fitness_history'],
                                     [b['start_probe_fitness']] + b['probe_fitness_history'])]
    rel = max(abs(y - x) / x for x, y in probes)
    doc = {'run': str(run), 'generations': args.generations, 'selection': 'tas' if args.tas else 'kl',
           'seconds': {'fp32': a['seconds'], 'amp_bf16': b['seconds']}, 'same_parents': same,
           'probe_fitness': {'fp32': [x for x, _ in probes], 'amp_bf16': [y for _, y in probes]}}
    out.mkdir(parents=True, exist_ok=True)
    (out / 'search_precision.json').write_text(json.dumps(doc, indent=1))
    print('| generation | probe KL fp32 | probe KL bf16 | same parent |\n|---|---|---|---|')
    for g, (x, y) in enumerate(probes):
        print(f'| {g} | {x:.4f} | {y:.4f} | {"start" if g == 0 else a["parents"][g - 1] == b["parents"][g - 1]} |')
    print(f'generations={args.generations} selection={doc["selection"]} fp32_s={a["seconds"]:.1f} '
          f'bf16_s={b["seconds"]:.1f} speedup={a["seconds"] / b["seconds"]:.2f} '
          f'same_parents={same}/{args.generations} probe_kl_max_rel_diff={rel:.4f}', flush=True)
    return doc


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
