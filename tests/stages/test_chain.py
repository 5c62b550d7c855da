"""Chained run stages: validation, references by name, skipping finished stages, re-running changed ones."""

import copy

import pytest
from conftest import REPO

from darwinlm_foundry.stages import runners as stage_runners
from darwinlm_foundry.stages.chain import RunManifest, load_run_yaml, run_chain
from darwinlm_foundry.stages.schema import parse_run


def chain(tmp_path):
    model = tmp_path / 'model'  # what the pre-run checks read: a config and a weights file
    model.mkdir(exist_ok=True)
    (model / 'config.json').write_text('{"model_type": "llama", "num_attention_heads": 4, "intermediate_size": 256}')
    (model / 'model.safetensors').write_bytes(b'')
    return {'run_dir': str(tmp_path / 'run'), 'stages': [
        {'name': 'data', 'kind': 'data', 'seq_len': 64},
        {'name': 'dense', 'kind': 'model', 'path': str(model)},
        {'name': 'db', 'kind': 'database', 'model': 'dense', 'data': 'data', 'calibration': {'num_sequences': 4}},
        {'name': 'search', 'kind': 'search', 'model': 'dense', 'database': 'db', 'data': 'data'},
        {'name': 'train', 'kind': 'train', 'model': 'search', 'data': 'data', 'train': {'max_duration': '1ba'}},
    ]}


def test_every_shipped_yaml_validates():
    for path in sorted((REPO / 'yamls').glob('darwinlm_*.yaml')):
        run, stages = parse_run(load_run_yaml(str(path)))
        assert stages, path


@pytest.mark.parametrize('edit, match', [
    (lambda c: c['stages'][2].update(calibraton={}),
     r"stages\[2\]\.calibraton: unknown key .*\(stage 'db', kind database\)"),
    (lambda c: c['stages'][3].update(database='train'), '`database: train` does not name an earlier stage'),
    (lambda c: c['stages'][4].update(model='data'), 'names a data stage, which produces no model'),
    (lambda c: c['stages'][1].update(kind='prune'), '`kind` must be one of'),
    (lambda c: c['stages'].append(dict(c['stages'][0])), "stage name 'data' is used twice"),
    (lambda c: c.update(unknown_top=1), r"run\.unknown_top: unknown key"),
], ids=['unknown_key', 'later_stage', 'data_as_model', 'unknown_kind', 'duplicate_name', 'unknown_top_key'])
def test_bad_configs_are_named(tmp_path, edit, match):
    cfg = chain(tmp_path)
    parse_run(copy.deepcopy(cfg))  # the unedited chain is valid: the error comes from the edit
    edit(cfg)
    with pytest.raises(ValueError, match=match):
        parse_run(cfg)


def test_finished_stages_skip_and_changed_inputs_rerun(tmp_path, monkeypatch):
    calls = []

    def fake(kind, outputs):
        def runner(cfg, stage_dir, refs, run, all_outputs):
            calls.append((stage_dir.rsplit('/', 1)[-1], {k: v for k, v in refs.items()}))
            return {name: f'{stage_dir}/{name}' for name in outputs}
        return runner

    from darwinlm_foundry.stages.schema import OUTPUTS
    monkeypatch.setattr(stage_runners, 'RUNNERS', {k: fake(k, v) for k, v in OUTPUTS.items()})
    # Outputs must exist on disk for a stage to count as finished.
    monkeypatch.setattr('darwinlm_foundry.stages.chain._outputs_exist', lambda outputs: True)
    cfg = chain(tmp_path)
    first = run_chain(copy.deepcopy(cfg), log=lambda s: None)
    assert [c[0] for c in calls] == ['data', 'dense', 'db', 'search', 'train']
    # References resolve to the named stage's outputs, never to hand-copied paths.
    refs = dict(calls)['search']
    assert refs['database']['database'] == first['db']['database']
    assert refs['model']['model'] == first['dense']['model']
    calls.clear()
    run_chain(copy.deepcopy(cfg), log=lambda s: None)
    assert calls == []
    # A changed input re-runs that stage and everything downstream of it, not the stages before.
    cfg['stages'][2]['calibration'] = {'num_sequences': 8}
    run_chain(copy.deepcopy(cfg), log=lambda s: None)
    assert [c[0] for c in calls] == ['db', 'search', 'train']
    assert set(RunManifest(cfg['run_dir']).stages) == {'data', 'dense', 'db', 'search', 'train'}
    # A stage whose output vanished re-runs, and so does everything downstream of it.
    calls.clear()
    monkeypatch.setattr('darwinlm_foundry.stages.chain._outputs_exist', lambda outputs: 'search' not in str(outputs))
    run_chain(copy.deepcopy(cfg), log=lambda s: None)
    assert [c[0] for c in calls] == ['search', 'train']


def test_chain_initialises_dist_with_its_timeout(tmp_path, monkeypatch):
    """Under several ranks the chain starts torch.distributed with `dist_timeout` (default a day): the other
    ranks wait at a barrier while rank 0 runs a one-process job (eval of several SmolLM2 models took longer
    than Composer's default 300 s, and the waiting rank died with a gloo timeout)."""
    from composer.utils import dist as real
    seen = []

    class TwoRanks:
        def __getattr__(self, name):
            return getattr(real, name)

        get_world_size = staticmethod(lambda: 2)
        is_initialized = staticmethod(lambda: bool(seen))
        get_global_rank = staticmethod(lambda: 0)
        initialize_dist = staticmethod(lambda device, timeout=300.0: seen.append((device, timeout)))

    from darwinlm_foundry.stages.schema import OUTPUTS
    monkeypatch.setattr('darwinlm_foundry.stages.chain._dist', lambda: TwoRanks())
    monkeypatch.setattr(stage_runners, 'RUNNERS', {k: (lambda *a: {}) for k in OUTPUTS})
    cfg = chain(tmp_path)
    cfg['stages'] = cfg['stages'][:1]
    run_chain(copy.deepcopy(cfg), log=lambda s: None)
    assert seen == [('cpu', 86400.0)]
    seen.clear()
    cfg['dist_timeout'] = 7200
    cfg['run_dir'] = str(tmp_path / 'second')
    run_chain(copy.deepcopy(cfg), log=lambda s: None)
    assert seen == [('cpu', 7200)]


def test_corrupt_manifest_is_refused(tmp_path):
    (tmp_path / 'stages.json').write_text('{not json')
    with pytest.raises(RuntimeError, match='is corrupt'):
        RunManifest(str(tmp_path))


@pytest.mark.skipif(not __import__('os').path.exists('/proc/self/clear_refs'), reason='per-stage peaks need Linux')
def test_each_stage_records_its_own_peak_memory(tmp_path, monkeypatch):
    import numpy as np

    from darwinlm_foundry.stages.schema import OUTPUTS

    def fake(kind, outputs):
        def runner(cfg, stage_dir, refs, run, all_outputs):
            if stage_dir.endswith('/db'):
                big = np.ones(2**26)  # 512 MiB, touched
                assert big.sum() == 2**26
            return {name: f'{stage_dir}/{name}' for name in outputs}
        return runner

    monkeypatch.setattr(stage_runners, 'RUNNERS', {k: fake(k, v) for k, v in OUTPUTS.items()})
    monkeypatch.setattr('darwinlm_foundry.stages.chain._outputs_exist', lambda outputs: True)
    lines = []
    run_chain(chain(tmp_path), log=lines.append)
    peaks = {name: rec['peak_rss_gb'] for name, rec in RunManifest(str(tmp_path / 'run')).stages.items()}
    # the 512 MiB of the db stage count there and not in the stages after it (each starts a new peak)
    assert peaks['db'] >= peaks['dense'] + 0.45 and peaks['search'] <= peaks['db'] - 0.45
    assert any(line.startswith('[darwinlm] stage db (database): done in') and 'peak RSS' in line for line in lines)


def test_memory_a_stage_frees_goes_back_before_the_next(tmp_path, monkeypatch):
    """A stage that leaves 512 MiB in a reference cycle (as a Composer Trainer does) does not pass it on: the chain
    collects and trims after every stage, and records what the process still holds (rss_after_gb)."""
    import gc

    import numpy as np

    from darwinlm_foundry.stages.schema import OUTPUTS

    def fake(kind, outputs):
        def runner(cfg, stage_dir, refs, run, all_outputs):
            if stage_dir.endswith('/db'):
                cycle = {'array': np.ones(2**26)}  # 512 MiB, touched
                cycle['self'] = cycle
            return {name: f'{stage_dir}/{name}' for name in outputs}
        return runner

    monkeypatch.setattr(stage_runners, 'RUNNERS', {k: fake(k, v) for k, v in OUTPUTS.items()})
    monkeypatch.setattr('darwinlm_foundry.stages.chain._outputs_exist', lambda outputs: True)
    gc.disable()  # only the chain's own collection may free the cycle
    try:
        run_chain(chain(tmp_path), log=lambda line: None)
    finally:
        gc.enable()
    stages = RunManifest(str(tmp_path / 'run')).stages
    assert stages['db']['peak_rss_gb'] >= stages['dense']['rss_after_gb'] + 0.45
    assert stages['db']['rss_after_gb'] <= stages['dense']['rss_after_gb'] + 0.1
