"""A finished chain's eval stage again, in a scratch directory: its time, peak memory and the same numbers.

The eval stage scores held-out text for models in groups that fit a memory budget beside the dense model, one
dense forward per batch for the whole group (``stages/eval.py``). Before 2026-12-04 it held every model and all
their logits at once (12.4 GB for the SmolLM2 chain's six fp32 models); on 2026-12-04/05 it scored one model at
a time, repeating the dense forward for each (``--resident-gb 0`` does that again). This re-runs the stage's own
function on the run's models with the YAML's eval settings, writes into ``--out`` (the run is not touched) and
compares every held-out and ICL number with the run's ``eval/eval.json``. LAST line::

    models=<n> wall_s=<s> peak_rss_gb=<GB> max_rel_ppl_diff=<vs the run's report> icl_equal=<True|False>

    python bench/eval_stage.py [--yaml yamls/darwinlm_smollm2.yaml] [--run runs/darwinlm_smollm2] [--no-icl]
                               [--fresh] [--resident-gb GB]

wall_s and peak_rss_gb describe the whole job only with ``--fresh`` (reused rows are not re-scored).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--yaml', default=str(REPO / 'yamls' / 'darwinlm_smollm2.yaml'))
    p.add_argument('--run', default=None, help="the run directory (default: the YAML's run_dir)")
    p.add_argument('--stage', default='eval')
    p.add_argument('--out', default=None, help='scratch stage directory (default <run>/eval_rerun)')
    p.add_argument('--fresh', action='store_true',
                   help='empty --out first; by default rows already scored there are reused, as the stage does '
                        'after a crash')
    p.add_argument('--no-icl', action='store_true', help='held-out scoring only (no ICL, no lm-eval)')
    p.add_argument('--resident-gb', type=float, default=None,
                   help="fp32 weights held at once beside the dense model (default: the stage's, half the "
                        'available memory; 0: one model at a time)')
    args = p.parse_args(argv)

    from darwinlm_foundry.stages.chain import load_run_yaml
    from darwinlm_foundry.utils.memory import peak_rss_gb
    from darwinlm_foundry.stages.eval import evaluate_models
    from darwinlm_foundry.stages.schema import parse_run

    run_cfg, stages = parse_run(load_run_yaml(args.yaml))
    stage = next(s for s in stages if s.name == args.stage)
    run = Path(args.run or run_cfg.run_dir).resolve()
    recorded = json.loads((run / 'stages.json').read_text())['stages']
    cfg = stage.config
    paths = {label: recorded[ref]['outputs']['model'] for label, ref in cfg.models.items()}
    out = Path(args.out or run / f'{args.stage}_rerun')
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    icl, lm_eval = (None, None) if args.no_icl else (cfg.icl, cfg.lm_eval)

    t0 = time.time()
    evaluate_models(paths=paths, dense=cfg.dense or next(iter(cfg.models)),
                    shards=recorded[cfg.data]['outputs']['shards'], heldout_sequences=cfg.heldout_sequences,
                    icl=icl, stage_dir=str(out), out_path=str(out / 'eval.json'), by_source=cfg.heldout_by_source,
                    lm_eval=lm_eval,
                    resident_bytes=None if args.resident_gb is None else args.resident_gb * 2**30)
    wall = time.time() - t0
    peak = peak_rss_gb()  # of this process: nothing else ran in it

    new = {r['method']: r for r in json.loads((out / 'eval.json').read_text())['rows']}
    old = {r['method']: r for r in json.loads((run / args.stage / 'eval.json').read_text())['rows']}
    rel, icl_equal = 0.0, True
    for label, row in new.items():
        ref = old[label]
        pairs = [(row['heldout_ppl'], ref['heldout_ppl'])] + [
            (row['heldout_by_source'][s]['ppl'], ref['heldout_by_source'][s]['ppl'])
            for s in row.get('heldout_by_source', {})]
        rel = max(rel, *(abs(a - b) / b for a, b in pairs))
        if 'tasks' in row:
            icl_equal &= row['tasks'] == ref['tasks']
        print(f'{label}: held-out ppl {row["heldout_ppl"]:.4f} (run {ref["heldout_ppl"]:.4f})'
              + (f', ICL {row["tasks"]}' if 'tasks' in row else ''))
    result = {'models': len(new), 'wall_s': round(wall), 'peak_rss_gb': round(peak, 2),
              'max_rel_ppl_diff': f'{rel:.1e}', 'icl_equal': icl_equal if not args.no_icl else 'n/a'}
    print(' '.join(f'{k}={v}' for k, v in result.items()))
    return result


if __name__ == '__main__':
    main()
