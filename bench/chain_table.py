"""The SmolLM2 chain's README table and stage times, from a finished run's ``stages.json`` and eval results.

    python bench/chain_table.py [--run runs/darwinlm_smollm2]

Prints the seconds of every stage, then one markdown row per evaluated model: parameters, held-out perplexity
and KL to the dense model (overall and per source domain), ICL accuracy per task, lm-eval accuracy. LAST line::

    dense_ppl=<d> uniform_ppl=<u> searched_ppl=<s> searched_vs_uniform=<s/u> total_s=<seconds of all stages>
"""

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = {'dense': 'dense', 'uniform5': 'uniform level 5', 'search5': 'searched level 5 (one-shot)',
         'train5': '+ post-train', 'search6': 'gradual: searched level 6', 'train6': '+ post-train'}


def short(source: str) -> str:
    return re.sub(r'(-rp)?\d$', '', source.replace('redpajama_', ''))  # redpajama_c4-rp1 -> c4, _book2 -> book


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', default=str(REPO / 'runs' / 'darwinlm_smollm2'))
    args = p.parse_args(argv)
    run = Path(args.run)
    stages = json.loads((run / 'stages.json').read_text())['stages']
    # the run's own eval report, or (a copy under bench/results/) the eval.json next to its stages.json
    report = next(f for f in (run / 'eval' / 'eval.json', run / 'eval.json') if f.is_file())
    results = json.loads(report.read_text())
    print('stage seconds: ' + ', '.join(f'{k} {v["seconds"]:.0f}' for k, v in stages.items()))
    rows = results['rows']
    sources = sorted({s for r in rows for s in r.get('heldout_by_source', {})})
    tasks = sorted({t for r in rows for t in r.get('tasks', {})})
    lm = sorted({t for r in rows for t in r.get('lm_eval', {})})
    head = ['model', 'params', 'held-out ppl', 'KL'] + [short(s) for s in sources] + \
        [t.split('/')[0] for t in tasks] + (['lm-eval ' + ' / '.join(t.replace('local_', '') for t in lm)] if lm else [])
    print('| ' + ' | '.join(head) + ' |')
    print('|---|' + '---:|' * (len(head) - 1))
    for r in rows:
        cells = [NAMES.get(r['method'], r['method']), f'{r["params"] / 1e6:.1f}M', f'{r["heldout_ppl"]:.2f}',
                 f'{r["heldout_kl"]:.3f}']
        cells += [f'{r["heldout_by_source"][s]["ppl"]:.1f}' if s in r.get('heldout_by_source', {}) else '-'
                  for s in sources]
        cells += [f'{r["tasks"][t]:.2f}' if t in r.get('tasks', {}) else '-' for t in tasks]
        if lm:
            cells.append(' / '.join(f'{r["lm_eval"][t]["acc"]:.2f}' if t in r.get('lm_eval', {}) else '-' for t in lm))
        print('| ' + ' | '.join(cells) + ' |')
    print(f'held-out tokens per domain: {results.get("heldout_sources")}')
    by = {r['method']: r for r in rows}
    out = {'dense_ppl': by['dense']['heldout_ppl'], 'uniform_ppl': by['uniform5']['heldout_ppl'],
           'searched_ppl': by['search5']['heldout_ppl'],
           'searched_vs_uniform': by['search5']['heldout_ppl'] / by['uniform5']['heldout_ppl'],
           'total_s': sum(v['seconds'] for v in stages.values())}
    print(' '.join(f'{k}={v:.4g}' for k, v in out.items()))
    return out


if __name__ == '__main__':
    main()
