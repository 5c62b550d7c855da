"""Peak memory (max RSS) of an evolutionary search on a real model, e.g. SmolLM2-135M (49152-token vocabulary).

The search runs in a child process built exactly as the ``search`` stage builds it
(``SparsityDatabase.open(db, model, verify='size')``, ``dense_tensor_getter(model)``, ``ShardTokens(<shards>/search)``,
the model's tokenizer) with the settings of ``yamls/darwinlm_smollm2.yaml``'s ``search5`` stage (target level 5,
8 offspring, survivors [2, 1], fitness tokens [2048, 4096], seq_len 512, batch 4) for a few generations; the
parent reads the child's peak resident set size (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, the number
``/usr/bin/time -v`` prints as "Maximum resident set size"). The child prints the winner, its fitness and the
per-generation history, so two runs (e.g. before / after a change) can be compared for identical results.

``--precondition-steps N`` first post-trains the model N steps (4 x 512 tokens, Composer) in the same process and
releases it, as a chain does before its gradual search; the peak reported is then the search's own from there (the
kernel's ``VmHWM``, reset after the fit).

``--before-pythonpath DIR`` also runs the same search with ``PYTHONPATH=DIR`` (a copy of an older
``darwinlm_foundry`` package, e.g. extracted with ``git show``) first and reports its peak as ``before_gb`` and
whether both runs chose the same winners with the same fitness; ``--before-gb X`` just records a number
measured earlier. The last line is::

    peak_rss_gb=<x> before_gb=<y> generations=<n> sec_per_generation=<s>

    python bench/search_memory.py --db runs/darwinlm_smollm2/database5/database \\
        --model runs/darwinlm_smollm2/dense/converted/<hash> --shards runs/darwinlm_smollm2/data/mds \\
        --out /tmp/search_work/bench [--generations 2] [--train-tokens 0,0]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

SETTINGS = dict(target_level=5, offspring=8, survivors=[2, 1], fitness_tokens=[2048, 4096], train_tokens=[0, 0],
                lr=1e-5, seq_len=512, train_batch_size=4, micro_batch_size=4, seed=0, progress_bar=False)


def child(args) -> None:
    """The search itself (in its own process, so that its peak RSS is its own)."""
    import torch
    from transformers import AutoTokenizer

    from darwinlm_foundry.obs.database import SparsityDatabase, dense_tensor_getter
    from darwinlm_foundry.search.engine import EvolutionarySearch
    from darwinlm_foundry.search.settings import SearchSettings
    from darwinlm_foundry.search.tokens import ShardTokens
    from darwinlm_foundry.utils.memory import peak_rss_gb, reset_peak_rss, rss_gb

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(SETTINGS, generations=args.generations, output_dir=args.child_out,
                    train_tokens=[int(t) for t in args.train_tokens.split(',')], **_overrides(args.set))
    if args.activation_checkpointing:
        settings['activation_checkpointing'] = True
    rss = {'import': rss_gb(), 'max': 0.0, 'shown': 0.0}

    t_start = time.perf_counter()

    def sample():  # the RSS over time, for the log (the peak reported is the kernel's, not this)
        while True:
            rss['max'] = max(rss['max'], rss_gb())
            # each new high by `trace` GB, between the engine's lines: which phase sets the peak
            if args.trace and rss['max'] >= rss['shown'] + args.trace:
                rss['shown'] = rss['max']
                print(f'  [rss {time.perf_counter() - t_start:7.1f} s] new high {rss["shown"]:.2f} GB', flush=True)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    if args.precondition_steps:
        _precondition(args)
        # the search's own peak from here (VmHWM; the parent's RUSAGE_CHILDREN would keep the fit's)
        if not reset_peak_rss():
            raise SystemExit('--precondition-steps needs /proc/self/clear_refs (Linux) to reset the peak')
        rss['max'] = rss['shown'] = 0.0
    db = SparsityDatabase.open(args.db, args.model, verify='size')
    getter = dense_tensor_getter(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    engine = EvolutionarySearch(SearchSettings.from_dict(settings), db, getter,
                                ShardTokens(os.path.join(args.shards, 'search')), tokenizer=tokenizer,
                                log_fn=lambda m, step: print('  ' + ' '.join(
                                    f'{k.split("/")[-1]}={v:.6g}' if isinstance(v, float) else
                                    f'{k.split("/")[-1]}={v}' for k, v in m.items())
                                    + f' rss_gb={rss_gb():.2f}', flush=True))
    t0 = time.perf_counter()
    result = engine.run()
    seconds = time.perf_counter() - t0
    history = [{'generation': h['generation'], 'fitness': h['fitness'], 'winner': h['winner'],
                'step_fitnesses': h['step_fitnesses'], **({'probe_fitness': h['probe_fitness']}
                                                          if 'probe_fitness' in h else {})}
               for h in result.history]
    print('RESULT ' + json.dumps({'levels': result.winner.to_dict(), 'fitness': result.fitness, 'history': history,
                                  'seconds': seconds, 'import_rss_gb': rss['import'], 'sampled_max_rss_gb': rss['max'],
                                  'stats': engine.stats, 'vmhwm_gb': peak_rss_gb()}), flush=True)


def _precondition(args) -> None:
    """What a chain process has done before its search: a short Composer fit of the model (4 x 512-token
    batches, fp32, AdamW, as a post-training), everything of it then released, as the chain releases it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from darwinlm_foundry.data.demo_pretrain import fit_causal_lm
    from darwinlm_foundry.utils.memory import release_memory, rss_gb

    model = AutoModelForCausalLM.from_pretrained(args.model)
    fit_causal_lm(model, args.shards, tokenizer=AutoTokenizer.from_pretrained(args.model),
                  steps=args.precondition_steps, batch_size=4, seq_len=SETTINGS['seq_len'], lr=1e-5)
    del model
    release_memory()
    print(f'  precondition: {args.precondition_steps} training steps, then released: rss {rss_gb():.2f} GB',
          flush=True)


def _overrides(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep:
            raise SystemExit(f'--set takes KEY=VALUE, got {pair!r}')
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _run_child(args, out_dir: str, pythonpath=None, extra=()) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env['PYTHONPATH'] = pythonpath + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    cmd = [sys.executable, os.path.abspath(__file__), '--child', '--child-out', out_dir, '--db', args.db,
           '--model', args.model, '--shards', args.shards, '--generations', str(args.generations),
           '--train-tokens', args.train_tokens, '--threads', str(args.threads), '--trace', str(args.trace),
           '--precondition-steps', str(args.precondition_steps), *[f'--set={kv}' for kv in args.set], *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = None
    for line in proc.stdout:
        if line.startswith('RESULT '):
            result = json.loads(line[len('RESULT '):])
        else:
            print(line, end='', flush=True)
    if proc.wait() != 0 or result is None:
        raise SystemExit(f'the search child failed (exit {proc.returncode}): {" ".join(cmd)}')
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb < before:
        raise RuntimeError('RUSAGE_CHILDREN went down')
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: run the smaller (new) one last or alone
    # with a precondition the child's own peak since it (VmHWM after a reset), else the kernel's for the child
    result['peak_rss_gb'] = result['vmhwm_gb'] if args.precondition_steps else peak_kb / 2**20
    return result


def _summary(name: str, r: dict) -> str:
    return (f'{name}: peak_rss={r["peak_rss_gb"]:.2f} GiB (sampled {r["sampled_max_rss_gb"]:.2f}, after imports '
            f'{r["import_rss_gb"]:.2f}), {r["seconds"]:.0f} s, winner fitness {r["fitness"]}, '
            f'fitness history {[h["fitness"] for h in r["history"]]}'
            + (f', probe fitness {[h["probe_fitness"] for h in r["history"]]}' if r['history'] and
               'probe_fitness' in r['history'][0] else ''))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--db', required=True, help='sparsity database directory of the model')
    p.add_argument('--model', required=True, help='HF checkpoint directory the database was built from')
    p.add_argument('--shards', required=True, help='MDS shards root (with a search/ split)')
    p.add_argument('--out', default=None, help='scratch directory for the searches (default: a temporary one)')
    p.add_argument('--generations', type=int, default=2)
    p.add_argument('--train-tokens', default='0,0', help='train_tokens per selection step, e.g. 4096,8192')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--activation-checkpointing', action='store_true',
                   help='activation_checkpointing: true for the fits of the measured run (not the before run)')
    p.add_argument('--before-pythonpath', default=None,
                   help='run the same search first with this PYTHONPATH (an older darwinlm_foundry copy)')
    p.add_argument('--before-gb', type=float, default=None, help='peak measured earlier, for the last line')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='a search setting over the search5 ones (VALUE as JSON, else a string), e.g. the gradual '
                        'search6: --set start_config=<search5 winner.json> --set target_level=null '
                        '--set extra_levels=1 --set balance_kinds=true --set protect_units=1')
    p.add_argument('--trace', type=float, default=0.0,
                   help='print the RSS each time it passes its last high by this many GB (0: off)')
    p.add_argument('--precondition-steps', type=int, default=0,
                   help='first train the model this many steps in the same process and release it (what a '
                        'chain does before a gradual search), to measure what that leaves to the search (0: off)')
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--child-out', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    out = args.out or tempfile.mkdtemp(prefix='search_memory_')
    print(f'settings: {dict(SETTINGS, generations=args.generations, train_tokens=args.train_tokens)}'
          + (' activation_checkpointing: true (measured run)' if args.activation_checkpointing else ''), flush=True)
    before_gb = args.before_gb
    before = None
    if args.before_pythonpath:
        before = _run_child(args, os.path.join(out, f'before_{os.getpid()}'), args.before_pythonpath)
        print(_summary('before', before), flush=True)
        before_gb = before['peak_rss_gb']
    # a fresh process for the measured run: RUSAGE_CHILDREN keeps the largest child's peak
    if before is not None:
        cmd = [sys.executable, os.path.abspath(__file__), '--db', args.db, '--model', args.model, '--shards',
               args.shards, '--out', out, '--generations', str(args.generations), '--train-tokens',
               args.train_tokens, '--threads', str(args.threads), '--before-gb', str(before_gb),
               '--trace', str(args.trace), '--precondition-steps', str(args.precondition_steps),
               *[f'--set={kv}' for kv in args.set],
               *(['--activation-checkpointing'] if args.activation_checkpointing else [])]
        lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
        print('\n'.join(lines[:-1]), flush=True)
        after = json.loads(next(line for line in lines if line.startswith('AFTER '))[len('AFTER '):])
        same = (after['levels'] == before['levels'] and after['fitness'] == before['fitness']
                and [h['fitness'] for h in after['history']] == [h['fitness'] for h in before['history']]
                and [h['winner'] for h in after['history']] == [h['winner'] for h in before['history']])
        print(f'same winners and fitness as before: {same}', flush=True)
        print(lines[-1], flush=True)
        return
    after = _run_child(args, os.path.join(out, f'after_{os.getpid()}'),
                       extra=['--activation-checkpointing'] if args.activation_checkpointing else [])
    print(_summary('after', after), flush=True)
    print('AFTER ' + json.dumps({k: after[k] for k in ('levels', 'fitness', 'history', 'peak_rss_gb')}), flush=True)
    print(f'peak_rss_gb={after["peak_rss_gb"]:.2f} before_gb={"nan" if before_gb is None else f"{before_gb:.2f}"} '
          f'generations={args.generations} sec_per_generation={after["seconds"] / max(1, args.generations):.1f}',
          flush=True)


if __name__ == '__main__':
    main()
