"""The evolutionary search engine and its Composer callback, on a tiny Llama pretrained on real text.

The model (2 layers, 10 MHA heads of 8, 320 MLP columns, so 10 levels of 1 head / 32 columns) is trained
for a few seconds on Llama-2 tokens of the RedPajama C4 text the package ships (``darwinlm_foundry/assets``),
its vocabulary cut to the 511 most frequent ids (+1 for the rest) so the CPU runs stay fast. Everything runs
with one torch thread (stable timings on a shared CPU, and bit-identical fits across processes).
"""

import copy
import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import ASSETS, REPO

from darwinlm_foundry.obs.database import build_database, dense_tensor_getter
from darwinlm_foundry.search.engine import EvolutionarySearch, STATE_FILE, WINNER_JSON
from darwinlm_foundry.search.fitness import DenseLogitCache
from darwinlm_foundry.search.settings import SearchSettings
from darwinlm_foundry.search.space import LevelConfig, uniform
from darwinlm_foundry.search.state import SearchStateError
from darwinlm_foundry.search.tokens import TensorTokens
from darwinlm_foundry.utils.dist import composer_rank_local

VOCAB = 512
SEQ = 64


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def tokens():
    """(N, 64) tokens of real English text in a 512-id vocabulary; rows 0..63 held out, the rest searched."""
    tok = transformers.LlamaTokenizerFast(vocab_file=str(ASSETS / 'llama2_tokenizer' / 'tokenizer.model'),
                                          legacy=True)
    texts = []
    with gzip.open(ASSETS / 'text' / 'redpajama_c4-rp1.jsonl.gz', 'rt', encoding='utf-8') as f:
        for line in f:
            texts.append(json.loads(line)['text'])
            if sum(map(len, texts)) > 600_000:
                break
    ids = [i for t in texts for i in tok(t)['input_ids'] + [tok.eos_token_id]]
    common = [i for i, _ in Counter(ids).most_common(VOCAB - 1)]
    remap = {old: new + 1 for new, old in enumerate(common)}
    flat = torch.tensor([remap.get(i, 0) for i in ids])
    n = len(flat) // SEQ
    return flat[:n * SEQ].view(n, SEQ)


@pytest.fixture(scope='module')
def pretrained(tokens):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=80, intermediate_size=320, num_hidden_layers=2,
                                      num_attention_heads=10, num_key_value_heads=10, head_dim=8,
                                      max_position_embeddings=SEQ, tie_word_embeddings=False)
    config._attn_implementation = 'eager'
    model = transformers.LlamaForCausalLM(config)
    train = tokens[256:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        batch = train[torch.randint(0, len(train), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert sum(losses[-20:]) / 20 < losses[0] - 1.5, 'the tiny model did not learn the text'
    return model.eval()


@pytest.fixture(scope='module')
def database(pretrained, tokens, tmp_path_factory):
    db_dir = tmp_path_factory.mktemp('search_db')
    calib = [tokens[64 + 8 * i:64 + 8 * (i + 1)] for i in range(4)]
    return build_database(pretrained, calib, db_dir, calibration_source='c4 sample')


def _settings(out, train=(0, 0), **kw):
    base = dict(target_level=5, generations=4, offspring=6, survivors=(3, 1), fitness_tokens=(512, 1024),
                train_tokens=train, lr=1e-4, seq_len=SEQ, train_batch_size=8, micro_batch_size=8,
                output_dir=str(out), progress_bar=False, seed=3, spill_targets_mib=0)  # spill: the lean path
    base.update(kw)
    return SearchSettings(**base)


def _engine(settings, pretrained, database, tokens, **kw):
    return EvolutionarySearch(settings, database, dense_tensor_getter(pretrained), TensorTokens(tokens[64:]), **kw)


def _strip(history, drop=('seconds',)):
    return [{k: v for k, v in h.items() if k not in drop} for h in history]


@pytest.fixture(scope='module')
def runs(pretrained, database, tokens, tmp_path_factory):
    """One uninterrupted search per selection mode; records every stitched candidate."""
    out = {}
    for name, train in (('one_shot', (0, 0)), ('training_aware', (512, 1024))):
        seen = []
        engine = _engine(_settings(tmp_path_factory.mktemp(name), train), pretrained, database, tokens,
                         candidate_hook=lambda config, model, seen=seen: seen.append(
                             (config, type(model).__name__, sum(p.numel() for p in model.parameters()))))
        out[name] = (engine, engine.run(), seen)
    return out


def test_settings_validation():
    with pytest.raises(ValueError, match=r'search settings\.\w+: unknown key'):
        SearchSettings.from_dict({'target_level': 5, 'generation': 3})
    with pytest.raises(ValueError, match='exactly one of target_level'):
        SearchSettings(target_level=None)
    with pytest.raises(ValueError, match='topk'):
        SearchSettings(fitness='topk_kl')
    with pytest.raises(ValueError, match='survivor'):
        SearchSettings(survivors=(4, 2), fitness_tokens=(1, 2), train_tokens=(0, 0))
    s = SearchSettings.from_dict({'target_level': 6, 'survivors': [2, 1], 'fitness_tokens': [64, 128],
                                  'train_tokens': [0, 0], 'offspring': 4})
    assert s.schedule.survivors == (2, 1) and s.schedule.offspring == 4 and s.lr == 1e-5
    # mutation strength: fingerprinted when it differs from the default (states from before the key resume)
    assert 'max_switches' not in s.result_fields()
    assert SearchSettings(max_switches=6).result_fields()['max_switches'] == 6
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match='max_switches'):
            SearchSettings(max_switches=bad)
    # source-balanced samples: likewise fingerprinted only when on; they need an MDS split, said before compute
    assert 'samples_by_source' not in s.result_fields()
    assert SearchSettings(samples_by_source=True).result_fields()['samples_by_source'] is True
    with pytest.raises(ValueError, match='samples_by_source must be true or false'):
        SearchSettings(samples_by_source='yes')
    # kind balance and its sample size: likewise fingerprinted only when used
    assert 'balance_kinds' not in s.result_fields() and 'balance_tokens' not in s.result_fields()
    assert SearchSettings(balance_kinds=True, balance_tokens=8192).result_fields()['balance_tokens'] == 8192
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match='balance_tokens'):
            SearchSettings(balance_tokens=bad)
    with pytest.raises(ValueError, match='balance_kinds must be true or false'):
        SearchSettings(balance_kinds=1)
    assert 'protect_units' not in s.result_fields()
    assert SearchSettings(protect_units=2).result_fields()['protect_units'] == 2
    assert 'balance_recheck_tokens' not in s.result_fields()
    assert SearchSettings(balance_recheck_tokens=8192).result_fields()['balance_recheck_tokens'] == 8192
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match='balance_recheck_tokens must be a positive integer'):
            SearchSettings(balance_recheck_tokens=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match='protect_units must be an integer >= 0'):
            SearchSettings(protect_units=bad)


@pytest.mark.parametrize('mode', ['one_shot', 'training_aware'])
def test_search_lowers_kl_against_uniform_start(runs, mode, tokens):
    engine, result, _ = runs[mode]
    fits, evaluations = engine.stats['fits'], engine.stats['evaluations']
    start = uniform(2, 5)
    assert result.winner != start, 'no offspring ever beat the uniform start'
    assert result.parameters == engine.spec.parameter_count(start)
    held_out = tokens[:32]
    if mode == 'one_shot':
        kl_win = engine.config_fitness(result.winner, held_out)
        kl_uni = engine.config_fitness(start, held_out)
    else:  # compare what training-aware selection optimises: KL after the same short fit
        train = tokens[32:64]
        kl_win = engine.config_fitness(result.winner, held_out, train_tokens=train, seed=1)
        kl_uni = engine.config_fitness(start, held_out, train_tokens=train, seed=1)
    assert kl_win < kl_uni, (mode, kl_win, kl_uni)
    fitness = result.fitness_history()
    assert len(fitness) == 4
    assert evaluations == 4 * (6 + 3 + 1)  # per generation: 6 offspring, then 3 survivors + the parent
    assert fits == (evaluations if mode == 'training_aware' else 0)


def test_offspring_are_real_shrunk_models(runs, database):
    spec = database.level_spec
    for engine, result, seen in runs.values():
        assert len(seen) >= engine.stats['evaluations'] == 4 * (6 + 3 + 1)
        size = spec.parameter_count(uniform(2, 5))
        assert size < spec.dense_parameter_count() * 0.75
        for config, cls, params in seen:
            assert cls == 'DarwinLMForCausalLM'
            assert params == spec.parameter_count(config) == size
        assert len({c for c, _, _ in seen}) > 6  # real mutants, not the parent again and again


def test_outputs_written(runs):
    engine, result, _ = runs['training_aware']
    with open(result.json_path, encoding='utf-8') as f:
        data = json.load(f)
    assert LevelConfig.from_dict(data['levels']) == result.winner
    assert data['parameters'] == result.parameters and data['fitness_history'] == result.fitness_history()
    assert data['heads'] == [10 - lvl for lvl in result.winner.attn]
    assert data['mlp_columns'] == [320 - 32 * lvl for lvl in result.winner.mlp]
    assert LevelConfig.read_file(result.text_path) == LevelConfig.read_file(result.json_path) == result.winner
    assert os.path.exists(os.path.join(engine.settings.output_dir, STATE_FILE))


def test_probe_fitness_is_the_parent_rescored_on_fixed_tokens(runs, pretrained, database, tokens, tmp_path):
    """Every generation re-scores the parent on the same probe tokens: reproducible, equal to a direct re-score,
    recorded in the state history and winner.json, and the comparable curve of the search."""
    engine, result, _ = runs['one_shot']
    probes = result.probe_fitness_history()
    assert len(probes) == 4 and all(isinstance(p, float) for p in probes)
    probe_tokens = engine.probe_sample()
    assert probe_tokens.shape == (1024 // SEQ, SEQ)  # default size: the last fitness_tokens step
    assert torch.equal(probe_tokens, engine.probe_sample())  # the same tokens every time
    # a fresh engine re-scores parents directly (through the ordinary fitness path): the same floats
    fresh = _engine(_settings(tmp_path / 'fresh'), pretrained, database, tokens)
    assert fresh.config_fitness(result.winner, probe_tokens) == result.probe_fitness == probes[-1]
    first = LevelConfig.from_dict(result.history[0]['winner'])
    assert fresh.config_fitness(first, probe_tokens) == probes[0]
    assert fresh.config_fitness(uniform(2, 5), probe_tokens) == result.start_probe_fitness
    for h, prev in zip(result.history[1:], probes):
        if h['parent_won']:  # the same parent: the same probe fitness (fresh-sample fitness differs)
            assert h['probe_fitness'] == prev
    # the state and winner.json record it next to the fresh-sample fitness
    state = json.loads(open(os.path.join(engine.settings.output_dir, STATE_FILE)).read())
    assert [h['probe_fitness'] for h in state['history']] == probes
    assert state['extra']['probe']['tokens'] == 1024
    assert state['extra']['start_probe_fitness'] == result.start_probe_fitness
    data = json.loads(open(result.json_path).read())
    assert [h['probe_fitness'] for h in data['history']] == data['probe_fitness_history'] == probes
    assert [h['fitness'] for h in data['history']] == data['fitness_history'] == result.fitness_history()
    assert data['probe_fitness'] == probes[-1] and data['probe_tokens'] == 1024
    assert engine.stats['evaluations'] == 4 * (6 + 3 + 1)  # the probe is not counted as a selection evaluation
    assert 1 <= engine.stats['probe_evaluations'] <= 5
    assert not [p for p in os.listdir(engine.settings.output_dir) if p.startswith('.probe')]  # scratch removed
    # probe_tokens: 0 switches it off, nothing else changes (same fingerprint: the state above would resume)
    off = _settings(tmp_path / 'off', probe_tokens=0)
    assert off.probe_size == 0 and off.result_fields() == engine.settings.result_fields()
    with pytest.raises(ValueError, match='probe_tokens'):
        _settings(tmp_path, probe_tokens=-1)


class _ReferenceSearch(EvolutionarySearch):
    """The engine's fitness path as it was before the memory work: the dense logits of a whole sample kept,
    all steps' targets prefilled at the start of a generation, prepared in one piece (log_softmax, exp, p log p
    over the whole tensor)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.cache = DenseLogitCache()  # full logits, computed in one call
        self.share_units = False  # every candidate stitched whole

    def dense_targets(self, key, tokens):
        targets = self.cache.get_or_compute(key, tokens, lambda t: self._logits(self._dense(), t))
        if not targets.is_prepared:
            log_p = targets.logits.float().log_softmax(-1)
            p = log_p.exp()
            targets._prepared = (p, torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1, dtype=torch.float64))
        return targets

    def _spill_dense_targets(self, tokens, name):  # fine-tuning steps: in memory as well
        return self.dense_targets(('spill', name), tokens)

    def evaluate(self, candidates, generation, step):
        if step == 0:
            self.prefill_dense(generation)
        return super().evaluate(candidates, generation, step)


@pytest.mark.parametrize('mode', ['one_shot', 'training_aware'])
def test_memory_lean_fitness_equals_the_reference_path(mode, runs, pretrained, database, tokens, tmp_path):
    """Targets computed a micro-batch at a time in prepared form, one step's at a time (in a file while
    candidates train), released file maps, freed optimizer state, trimmed heap, KL-only candidates assembled
    from a step's shared units: the same candidates win with
    bit-identical fitness as with whole-sample logits prepared in one piece. Fine-tuning fits with activation
    checkpointing (the reference run here) give the same fitness bit for bit too."""
    _, lean, _ = runs[mode]
    train = (512, 1024) if mode == 'training_aware' else (0, 0)
    models = []
    ref = _ReferenceSearch(_settings(tmp_path, train, probe_tokens=0, activation_checkpointing=bool(train[0])),
                           database, dense_tensor_getter(pretrained), TensorTokens(tokens[64:]),
                           candidate_hook=lambda config, model: models.append(model)).run()
    assert all(m.model.gradient_checkpointing == bool(train[0]) for m in models)
    models.clear()
    # the same trajectory (without a probe the reference returns its last parent: winner 'auto' -> 'last')
    assert ref.winner_rule == 'last' and ref.winner.to_dict() == lean.history[-1]['winner']
    assert ref.fitness == lean.history[-1]['fitness']
    assert _strip(ref.history) == _strip(lean.history, drop=('seconds', 'probe_fitness'))
    assert ref.probe_fitness is None and 'probe_fitness' not in ref.history[0]


def test_small_targets_of_fine_tuning_steps_stay_in_memory(pretrained, database, tokens, tmp_path):
    """A fine-tuning step (and the probe) spill their dense targets only above ``spill_targets_mib``; the
    fitness is the same bit for bit either way."""
    from darwinlm_foundry.search.space import LevelBounds, make_offspring, make_rng
    candidates = make_offspring(uniform(2, 5), 3, LevelBounds.full(2, max_level=9), make_rng(1))
    fitness = {}
    for mib in (0, 256):
        engine = _engine(_settings(tmp_path / str(mib), (512, 1024), spill_targets_mib=mib), pretrained, database,
                         tokens)
        spills = []
        spill = engine._spill_dense_targets
        engine._spill_dense_targets = lambda rows, name: spills.append(name) or spill(rows, name)
        fitness[mib] = engine.evaluate(candidates, 0, 0) + [engine.probe_fitness(candidates[0])]
        # 512 tokens x 512 vocabulary x 4 bytes = 1 MiB of targets
        assert engine._targets_bytes(engine._rows(engine.fitness_sample(0, 0))) == 2 ** 20
        assert spills == (['step_0_0', 'probe'] if mib == 0 else [])
    assert fitness[0] == fitness[256]


def test_bf16_autocast_on_a_cpu_scores_and_fits_near_fp32(pretrained, database, tokens, tmp_path):
    """precision amp_bf16 on a CPU: candidates' forwards and fine-tuning fits run under bf16 autocast (Composer's
    own amp_bf16 refuses CPUs, so the fit is autocast around it) while the dense targets stay fp32: the fitness of
    every candidate, scored alone or after a fit, is within bf16 rounding of the fp32 one but not equal to it."""
    from darwinlm_foundry.search.space import LevelBounds, make_offspring, make_rng
    candidates = make_offspring(uniform(2, 5), 3, LevelBounds.full(2, max_level=9), make_rng(1))
    fitness, targets = {}, {}
    for precision in ('fp32', 'amp_bf16'):
        for train in ((0, 0), (512, 1024)):
            engine = _engine(_settings(tmp_path / f'{precision}{train[0]}', train, precision=precision,
                                       spill_targets_mib=256), pretrained, database, tokens)
            fitness[precision, train] = engine.evaluate(candidates, 0, 1)
        rows = engine._rows(engine.fitness_sample(0, 1))
        targets[precision] = engine.dense_targets(('t',), rows).rows(0, len(rows))
    for train in ((0, 0), (512, 1024)):
        assert fitness['amp_bf16', train] == pytest.approx(fitness['fp32', train], rel=2e-2)
        assert fitness['amp_bf16', train] != fitness['fp32', train]
    assert fitness['fp32', (512, 1024)] != fitness['fp32', (0, 0)]  # the fit trained
    a, b = targets['fp32']._prepared, targets['amp_bf16']._prepared
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_zero_generations_is_the_uniform_baseline(pretrained, database, tokens, tmp_path, monkeypatch, capsys):
    """generations: 0 through the search stage: the start configuration wins, winner.json carries its probe
    fitness, the stage writes the stitched start model; nothing is searched."""
    from darwinlm_foundry.search import tokens as search_tokens
    from darwinlm_foundry.stages.search import run_search_stage
    from omegaconf import OmegaConf

    model_dir = tmp_path / 'dense'
    pretrained.save_pretrained(model_dir, safe_serialization=True)
    transformers.LlamaTokenizerFast(vocab_file=str(ASSETS / 'llama2_tokenizer' / 'tokenizer.model'),
                                    legacy=True).save_pretrained(model_dir)
    # the stage reads <shards>/search; serve the test tokens instead of MDS shards
    monkeypatch.setattr(search_tokens, 'ShardTokens', lambda split: TensorTokens(tokens[64:]))
    cfg = OmegaConf.create({'search': {'target_level': 5, 'generations': 0, 'seq_len': SEQ, 'progress_bar': False,
                                       'fitness_tokens': [512, 1024], 'train_tokens': [0, 0], 'survivors': [3, 1],
                                       'offspring': 6, 'micro_batch_size': 8},
                            'start': None})
    refs = {'model': {'model': str(model_dir)}, 'database': {'database': database.db_dir},
            'data': {'shards': str(tmp_path / 'shards')}}
    out = run_search_stage(cfg, str(tmp_path / 'stage'), refs, SimpleNamespace(seed=3), {})
    printed = capsys.readouterr().out
    data = json.loads(open(out['levels']).read())
    start = uniform(2, 5)
    assert LevelConfig.from_dict(data['levels']) == start and data['generations'] == 0
    assert data['history'] == [] and data['fitness_history'] == []
    engine = _engine(_settings(tmp_path / 'check', generations=0), pretrained, database, tokens)
    direct = engine.config_fitness(start, engine.probe_sample())
    assert data['fitness'] == data['probe_fitness'] == data['start_probe_fitness'] == direct
    assert '[darwinlm] search generation=0' in printed and 'probe_fitness=' in printed
    assert '0 generations (the start configuration), probe fitness' in printed
    stitched = transformers.AutoModelForCausalLM.from_pretrained(out['model'], trust_remote_code=True)
    assert stitched.config.levels == start.to_dict()
    assert sum(p.numel() for p in stitched.parameters()) == database.level_spec.parameter_count(start)
    # without a probe: the start configuration with no fitness at all
    result = _engine(_settings(tmp_path / 'none', generations=0, probe_tokens=0), pretrained, database,
                     tokens).run()
    assert result.winner == start and result.fitness is None and result.probe_fitness is None
    assert json.loads(open(tmp_path / 'none' / WINNER_JSON).read())['fitness'] is None


class _Stop(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(runs, pretrained, database, tokens, tmp_path):
    _, full, _ = runs['training_aware']
    settings = _settings(tmp_path, (512, 1024))

    def stop_after_two(state, result):
        if state.generation == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _engine(settings, pretrained, database, tokens).run(on_generation=stop_after_two)
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert saved['generation'] == 2
    resumed_engine = _engine(settings, pretrained, database, tokens)
    resumed = resumed_engine.run()
    assert resumed_engine.stats['evaluations'] == 2 * (6 + 3 + 1)  # only generations 2 and 3 ran again
    assert resumed.winner == full.winner
    assert _strip(resumed.history) == _strip(full.history)
    # other settings must not resume this state
    with pytest.raises(RuntimeError, match='different settings'):
        _engine(_settings(tmp_path, (512, 1024), lr=2e-4), pretrained, database, tokens).run()


def test_state_from_before_the_probe_resumes(runs, pretrained, database, tokens, tmp_path):
    """A search_state.json written before the probe existed (no probe in its records or extra) resumes to the
    same result; the new generations get a probe fitness. Another probe size does not resume."""
    _, full, _ = runs['one_shot']
    settings = _settings(tmp_path)

    def stop_after_two(state, result):
        if state.generation == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _engine(settings, pretrained, database, tokens).run(on_generation=stop_after_two)
    path = tmp_path / STATE_FILE
    saved = json.loads(path.read_text())
    for record in saved['history']:
        del record['probe_fitness']
    del saved['extra']['probe'], saved['extra']['start_probe_fitness']
    path.write_text(json.dumps(saved))
    with pytest.raises(SearchStateError, match='probe_tokens: 1024'):
        with_probe = json.loads(path.read_text())
        with_probe['extra']['probe'] = {'tokens': 1024}
        path.write_text(json.dumps(with_probe))
        _engine(_settings(tmp_path, probe_tokens=512), pretrained, database, tokens).run()
    path.write_text(json.dumps(saved))
    resumed = _engine(settings, pretrained, database, tokens).run()
    assert resumed.winner == full.winner
    assert _strip(resumed.history, ('seconds', 'probe_fitness')) == _strip(full.history, ('seconds', 'probe_fitness'))
    assert resumed.probe_fitness_history() == [None, None] + full.probe_fitness_history()[2:]
    assert resumed.start_probe_fitness is None



def test_a_finished_search_extends_to_more_generations(runs, pretrained, database, tokens, tmp_path):
    """``generations`` is a total: a finished 2-generation search run again with 4 continues and equals the
    uninterrupted 4-generation search; a state fingerprinted the old way (with its number of generations) resumes
    with that number, is rewritten in the new form, and then extends too."""
    _, full, _ = runs['one_shot']
    two = _engine(_settings(tmp_path / 'new', generations=2), pretrained, database, tokens).run()
    assert _strip(two.history) == _strip(full.history)[:2]
    extended = _engine(_settings(tmp_path / 'new'), pretrained, database, tokens)
    result = extended.run()
    assert extended.stats['evaluations'] == 2 * (6 + 3 + 1)  # only generations 2 and 3 ran
    assert result.winner == full.winner and _strip(result.history) == _strip(full.history)

    from darwinlm_foundry.search.state import settings_fingerprint
    old = tmp_path / 'old'
    engine2 = _engine(_settings(old, generations=2), pretrained, database, tokens)
    engine2.run()
    state = json.loads((old / STATE_FILE).read_text())
    assert state['fingerprint'] == settings_fingerprint(engine2.fingerprint_fields())
    state['fingerprint'] = settings_fingerprint(engine2.fingerprint_fields(legacy=True))  # as written before
    (old / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(RuntimeError, match='different settings'):  # the old form holds its total
        _engine(_settings(old), pretrained, database, tokens).run()
    _engine(_settings(old, generations=2), pretrained, database, tokens).run()  # resumes; rewritten in the new form
    assert json.loads((old / STATE_FILE).read_text())['fingerprint'] == settings_fingerprint(engine2.fingerprint_fields())
    assert _engine(_settings(old), pretrained, database, tokens).run().winner == full.winner

def test_collections_inside_a_step_see_only_its_own_objects():
    """The search's per-candidate ``gc.collect()`` frees a cycle made inside the step without walking the
    process's older objects, and leaves the collector as it found it (a caller's own freeze included)."""
    import gc
    import weakref

    from darwinlm_foundry.search.candidates import _collect_new_objects_only

    class Node:
        pass

    def walked(obj):  # whether collections walk obj (frozen objects are in no generation)
        return any(o is obj for o in gc.get_objects())

    older = Node()
    assert walked(older)
    with _collect_new_objects_only():
        assert not walked(older)  # frozen for the step
        cycle = Node()
        cycle.self = cycle
        ref = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert ref() is None  # the step's cycle is freed
    assert walked(older)  # unfrozen again
    gc.freeze()
    try:
        with _collect_new_objects_only():
            pass
        assert not walked(older)  # a caller's freeze is kept
    finally:
        gc.unfreeze()


def test_rank_local_view_restores_composer_dist():
    import composer.utils.dist as cdist
    before = cdist.dist
    with composer_rank_local():
        assert cdist.get_world_size() == 1
    assert cdist.dist is before


@pytest.mark.slow(seconds=80)
@pytest.mark.parametrize('mode', ['offspring_parallel', 'fsdp'])
def test_two_process_launch_agrees(mode, pretrained, database, tokens, tmp_path):
    """Both distributed modes under `composer -n 2` agree across ranks and with one process.

    offspring_parallel: each rank fits its own candidates. fsdp: both ranks fit every candidate together, each on
    half the rows of every batch (on CPU Composer's DDP stands in for FSDP, which needs CUDA): the averaged
    gradients and the summed fitness parts equal the one-process ones up to float rounding.
    """
    composer_bin = shutil.which('composer', path=os.path.dirname(sys.executable))
    assert composer_bin, 'the composer launcher is not installed next to this python'
    work = tmp_path / 'dist'
    pretrained.save_pretrained(work / 'dense', safe_serialization=True)
    shutil.copytree(database.db_dir, work / 'db')
    torch.save(tokens[64:], work / 'tokens.pt')
    # 5 offspring over 2 ranks: in offspring_parallel rank 0 takes 3 candidates and rank 1 two
    settings = _settings(work / 'out', (256, 512), generations=2, offspring=5, distributed=mode)
    (work / 'settings.json').write_text(json.dumps(settings.to_dict()))
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([composer_bin, '-n', '2', '--stdout', str(work / 'rank{rank}.out'), '--stderr',
                           str(work / 'rank{rank}.err'), str(REPO / 'tests' / 'search' / '_search_dist.py'), str(work)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    logs = ''.join(p.read_text()[-3000:] for p in sorted(work.glob('rank*.err')))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    ranks = [json.loads((work / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert ranks[0]['levels'] == ranks[1]['levels']
    assert ranks[0]['fitness_history'] == ranks[1]['fitness_history']
    assert all(r['mode'] == mode and r['world_size'] == 2 for r in ranks)
    if mode == 'offspring_parallel':
        assert ranks[0]['fits_here'] > ranks[1]['fits_here'] > 0  # candidates were split, unevenly
        tolerance = dict(rel=1e-6, abs=1e-9)
    else:
        assert ranks[0]['fits_here'] == ranks[1]['fits_here']  # every candidate on both ranks (checked below)
        assert 'data-parallel over the 2 ranks' in proc.stderr + logs  # (the launcher echoes rank 0 itself)
        tolerance = dict(rel=1e-4, abs=1e-7)  # gradients averaged over ranks: float rounding differs
    # Fits are seeded per (generation, step) and run with one thread, so one process gives the same answer.
    engine = _engine(_settings(tmp_path / 'single', (256, 512), generations=2, offspring=5), pretrained, database,
                     tokens)
    single = engine.run()
    assert single.winner.to_dict() == ranks[0]['levels']
    assert single.fitness_history() == pytest.approx(ranks[0]['fitness_history'], **tolerance)
    if mode == 'fsdp':
        assert ranks[0]['fits_here'] == engine.stats['fits']


def test_fsdp_mode_scores_unfitted_candidates(runs, pretrained, database, tokens, tmp_path):
    """A KL-only search in fsdp mode scores plain (unwrapped) candidates: with one rank its fitness is the
    single-process one (this crashed with a batch dict passed to the bare model)."""
    engine, result, _ = runs['one_shot']
    fsdp = _engine(_settings(tmp_path / 'fsdp'), pretrained, database, tokens)
    fsdp.mode = 'fsdp'
    candidates = [result.winner, fsdp.start]
    assert fsdp.evaluate(candidates, 0, 0) == pytest.approx(engine.evaluate(candidates, 0, 0), rel=1e-6)


def test_fsdp_rows_are_even_over_ranks():
    """fsdp mode gives every rank the same number of rows (each forward / step is a collective there)."""
    engine = EvolutionarySearch.__new__(EvolutionarySearch)
    engine.mode, engine.world_size, engine.settings = 'fsdp', 3, SimpleNamespace(seq_len=4)
    rows = torch.arange(8).unsqueeze(1)
    shares = []
    for engine.rank in range(3):
        shares.append(engine._rows(rows).flatten().tolist())
    assert shares == [[0, 3], [1, 4], [2, 5]]  # 6 of the 8 rows, 2 per rank
    with pytest.raises(ValueError, match='at least world_size x seq_len'):
        engine._rows(rows[:2])
    engine.mode = 'offspring_parallel'
    assert engine._rows(rows) is rows


# --------------------------------------------------------------------------------------------------
# The Composer callback
# --------------------------------------------------------------------------------------------------
class _Recorder:
    """A Composer logger destination keeping every logged metric (built lazily: composer import is slow)."""

    @staticmethod
    def make():
        from composer.loggers import LoggerDestination

        class Recorder(LoggerDestination):
            def __init__(self):
                self.metrics, self.hparams, self.tables = [], {}, []

            def log_metrics(self, metrics, step=None):
                self.metrics.append((step, dict(metrics)))

            def log_hyperparameters(self, hyperparameters):
                self.hparams.update(hyperparameters)

            def log_table(self, columns, rows, name='Table', step=None):
                self.tables.append((name, step, rows))

        return Recorder()


def _trainer(model, callback, recorder, batches):
    from composer import Trainer
    from composer.models import HuggingFaceModel
    cm = HuggingFaceModel(model, use_logits=True, metrics=[], shift_labels=True)
    return Trainer(model=cm, train_dataloader=batches, max_duration='2ba', device='cpu', seed=0,
                   optimizers=torch.optim.AdamW(cm.parameters(), lr=1e-3), callbacks=[callback], loggers=[recorder],
                   progress_bar=False, log_to_console=False, device_train_microbatch_size=4)


@pytest.mark.parametrize('search_only', [False, True])
def test_callback_searches_applies_and_posttrains(search_only, pretrained, database, tokens, tmp_path):
    import importlib
    cb_mod = importlib.import_module('darwinlm_foundry.callbacks.evolutionary_search')
    # balance_kinds: its step-0 key is logged too
    settings = _settings(tmp_path / 'out', generations=2, offspring=3, survivors=(2, 1), balance_kinds=True).to_dict()
    callback = cb_mod.DarwinLMSearch(database=database.db_dir, data=TensorTokens(tokens[64:]), apply=True,
                                     search_only=search_only, **settings)
    recorder = _Recorder.make()
    model = copy.deepcopy(pretrained)
    batches = [{'input_ids': tokens[64 + 4 * i:68 + 4 * i], 'labels': tokens[64 + 4 * i:68 + 4 * i]}
               for i in range(2)]
    rng_before = torch.get_rng_state()
    trainer = _trainer(model, callback, recorder, batches)
    result = callback.result
    # INIT ran the search, wrote the outputs and swapped in the shrunk winner
    assert json.loads(open(result.json_path).read())['levels'] == result.winner.to_dict()
    winner = trainer.state.model.model
    assert type(winner).__name__ == 'DarwinLMForCausalLM'
    assert sum(p.numel() for p in winner.parameters()) == result.parameters
    assert winner.config.levels == result.winner.to_dict()
    opt_params = {id(p) for g in trainer.state.optimizers[0].param_groups for p in g['params']}
    assert opt_params == {id(p) for p in winner.parameters()}
    logged = [m for _, m in recorder.metrics if 'search/fitness' in m]
    assert [m['search/generation'] for m in logged] == [1, 2]
    assert all(m['search/params'] == result.parameters and m['search/sec_per_offspring'] > 0 for m in logged)
    # every generation, with the probe fitness; step 0 is the start configuration
    probes = [(step, m['search/probe_fitness']) for step, m in recorder.metrics if 'search/probe_fitness' in m]
    assert probes == [(0, result.start_probe_fitness)] + list(enumerate(result.probe_fitness_history(), 1))
    assert [step for step, m in recorder.metrics if 'search/level/attn_00' in m] == [0, 1, 2]
    assert recorder.tables and recorder.hparams['search/winner_params'] == result.parameters
    assert recorder.hparams['search/winner_probe_fitness'] == result.probe_fitness
    del rng_before
    before = {k: v.clone() for k, v in winner.state_dict().items()}
    trainer.fit()
    changed = any(not torch.equal(before[k], v) for k, v in winner.state_dict().items())
    assert int(trainer.state.timestamp.batch) == (0 if search_only else 2)
    assert changed == (not search_only)
    trainer.close()


def test_callback_with_zero_generations_applies_the_start(pretrained, database, tokens, tmp_path):
    """generations: 0 through the callback: the start configuration is logged as step 0 and swapped in."""
    import importlib
    cb_mod = importlib.import_module('darwinlm_foundry.callbacks.evolutionary_search')
    settings = _settings(tmp_path / 'out', generations=0).to_dict()
    callback = cb_mod.DarwinLMSearch(database=database.db_dir, data=TensorTokens(tokens[64:]), apply=True,
                                     search_only=True, **settings)
    recorder = _Recorder.make()
    batches = [{'input_ids': tokens[64:68], 'labels': tokens[64:68]}]
    trainer = _trainer(copy.deepcopy(pretrained), callback, recorder, batches)
    result = callback.result
    assert result.generations == 0 and result.winner == uniform(2, 5) and result.history == []
    assert result.fitness == result.probe_fitness == result.start_probe_fitness is not None
    assert [(step, m['search/probe_fitness']) for step, m in recorder.metrics if 'search/probe_fitness' in m] == [
        (0, result.fitness)]
    assert recorder.hparams['search/winner_fitness'] == result.fitness
    assert trainer.state.model.model.config.levels == uniform(2, 5).to_dict()
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0
    trainer.close()


def _documented_keys(doc):
    """(metric key patterns from the docstring's table, hyperparameter keys from its 'Hyperparameters' paragraph)."""
    import re
    table = [line for line in doc.splitlines() if line.strip().startswith('| `')]
    metrics = {k for line in table for k in re.findall(r'(?<!`)`(search/[^`]+)`(?!`)', line.split('|')[1])}
    hparams_text = doc[doc.index('Hyperparameters, logged once'):doc.index('Args:')]
    hparams = set(re.findall(r'(?<!`)`(search/[^`]+)`(?!`)', hparams_text))
    return metrics, hparams


def test_callback_logs_exactly_the_documented_keys(pretrained, database, tokens, tmp_path):
    """Every key in the callback's docstring table is logged through Composer's Logger (to a stock
    InMemoryLogger destination), and nothing else; likewise the hyperparameters its docstring names."""
    import importlib
    import re

    from composer.loggers import InMemoryLogger
    cb_mod = importlib.import_module('darwinlm_foundry.callbacks.evolutionary_search')
    documented, documented_hparams = _documented_keys(cb_mod.DarwinLMSearch.__doc__)
    tables = {k for k in documented if k == 'search/levels'}  # logged with log_table
    patterns = {k: re.compile(re.escape(k).replace('<LL>', r'\d\d')) for k in documented - tables}
    # balance_kinds and protect_units: their step-0 keys are logged too
    settings = _settings(tmp_path / 'out', generations=2, offspring=3, survivors=(2, 1), balance_kinds=True,
                         protect_units=1).to_dict()
    callback = cb_mod.DarwinLMSearch(database=database.db_dir, data=TensorTokens(tokens[64:]), apply=False,
                                     search_only=True, **settings)
    memory = InMemoryLogger()
    trainer = _trainer(copy.deepcopy(pretrained), callback, memory, [{'input_ids': tokens[64:68],
                                                                        'labels': tokens[64:68]}])
    logged = {k for k in memory.data if k.startswith('search/')}
    unmatched = {k for k in logged if not any(p.fullmatch(k) for p in patterns.values())}
    never = {k for k, p in patterns.items() if not any(p.fullmatch(key) for key in logged)}
    assert not unmatched and not never, (unmatched, never)
    assert len([k for k in logged if k.startswith('search/level/')]) == 4  # 2 layers x (attn, mlp)
    assert set(memory.tables) == tables
    # generation 0 (the start) and every generation after it
    assert [v for _, v in memory.data['search/generation']] == [0, 1, 2]
    assert {k for k in memory.hyperparameters if k.startswith('search/')} == documented_hparams
    trainer.close()


def test_yaml_callback_block_builds_the_callback():
    """yamls/search_tiny.yaml: its darwinlm_search block is a valid DarwinLMSearch config in both variants."""
    import importlib

    from omegaconf import OmegaConf
    cb_mod = importlib.import_module('darwinlm_foundry.callbacks.evolutionary_search')
    for search_only in (False, True):
        cfg = OmegaConf.load(REPO / 'yamls' / 'search_tiny.yaml')
        cfg.variables.search_only = search_only
        block = OmegaConf.to_container(cfg, resolve=True)['callbacks']['darwinlm_search']
        callback = cb_mod.DarwinLMSearch(**block)
        assert callback.search_only is search_only and callback.apply
        assert callback.settings.target_level == 5 and callback.settings.schedule.survivors == (2, 1)


@pytest.mark.parametrize('fitness_tokens, fits, want', [((512,), False, 'offspring_parallel'),
                                                         ((1024,), False, 'fsdp'),
                                                         ((512,), True, 'offspring_parallel')])
def test_auto_mode_never_picks_fsdp_for_samples_smaller_than_the_world(fitness_tokens, fits, want):
    """Under memory pressure ``auto`` wants fsdp, which splits every sample's rows over the ranks: a 1-sequence
    sample over 2 ranks cannot be split, so auto must keep offspring-parallel instead of failing at the search."""
    settings = SearchSettings(fitness_tokens=fitness_tokens, train_tokens=(0,), survivors=(1,), seq_len=512,
                              probe_tokens=0)
    stub = SimpleNamespace(world_size=2, settings=settings, device=torch.device('cpu'),
                           _candidate_memory_bytes=lambda: 0 if fits else float('inf'))
    stub._smallest_sample_rows = lambda: EvolutionarySearch._smallest_sample_rows(stub)
    assert EvolutionarySearch._resolve_mode(stub) == want


def test_auto_mode_does_not_depend_on_free_memory(monkeypatch):
    """``auto`` on CPU decides from the machine's total memory, not what happens to be free: a rerun after a
    kill (or beside another job) must resolve the same mode as the first run."""
    import darwinlm_foundry.search.engine as engine_mod
    settings = SearchSettings(fitness_tokens=(1024,), train_tokens=(0,), survivors=(1,), seq_len=512,
                              probe_tokens=0)
    stub = SimpleNamespace(world_size=2, settings=settings, device=torch.device('cpu'),
                           _candidate_memory_bytes=lambda: 2**30)
    stub._smallest_sample_rows = lambda: EvolutionarySearch._smallest_sample_rows(stub)
    modes = []
    for free_pages in (1, 2**40):
        pages = {'SC_PAGE_SIZE': 4096, 'SC_PHYS_PAGES': 2**22, 'SC_AVPHYS_PAGES': free_pages}  # 16 GiB total
        monkeypatch.setattr(engine_mod.os, 'sysconf', lambda name: pages[name])
        modes.append(EvolutionarySearch._resolve_mode(stub))
    assert modes == ['offspring_parallel', 'offspring_parallel']


def test_samples_by_source_needs_an_mds_split(pretrained, database, tokens, tmp_path):
    """Balanced samples need the converter's per-row sources: an in-memory tensor is refused at construction."""
    with pytest.raises(ValueError, match='samples_by_source needs an MDS split'):
        _engine(_settings(tmp_path, samples_by_source=True), pretrained, database, tokens)


def test_finer_mlp_levels_search_from_the_same_uniform_model(pretrained, database, tokens, tmp_path):
    """mlp_split=2: the search starts from the same uniform model (MLP level 10 of 20 = level 5 of 10), every
    offspring keeps its size exactly, max_level bounds the MLP at twice the nominal level, the winner records it."""
    from darwinlm_foundry.search.space import total_levels
    calib = [tokens[64 + 8 * i:64 + 8 * (i + 1)] for i in range(4)]
    fine = build_database(pretrained, calib, tmp_path / 'db', calibration_source='c4 sample', mlp_split=2)
    seen = []
    engine = _engine(_settings(tmp_path / 'fine', generations=2, max_level=8), pretrained, fine, tokens,
                     candidate_hook=lambda config, model: seen.append(
                         (config, sum(p.numel() for p in model.parameters()))))
    assert engine.start == uniform(2, 5, mlp_split=2) == LevelConfig(attn=[5, 5], mlp=[10, 10])
    assert engine.bounds.upper == LevelConfig(attn=[8, 8], mlp=[16, 16])
    coarse = _engine(_settings(tmp_path / 'coarse', generations=0), pretrained, database, tokens)
    probe = engine.probe_sample()
    assert engine.config_fitness(engine.start, probe) == coarse.config_fitness(uniform(2, 5), probe)
    result = engine.run()
    size = database.level_spec.parameter_count(5)
    assert seen and all(total_levels(c) == {'attn': 10, 'mlp': 20} and n == size for c, n in seen)
    assert all(max(c.mlp) <= 16 for c, _ in seen) and any(lvl % 2 for c, _ in seen for lvl in c.mlp)
    winner = json.loads((tmp_path / 'fine' / WINNER_JSON).read_text())
    assert winner['mlp_level_split'] == 2 and winner['level_steps'] == {'attn': 1, 'mlp': 16}
    assert fine.level_spec.parameter_count(result.winner.to_dict()) == size


def test_winner_best_probe_returns_the_parent_with_the_lowest_probe(pretrained, database, tokens, tmp_path):
    """winner: best_probe (the default for one-shot selection) returns the parent, the start included, with the
    lowest probe fitness; winner: last the final parent; the rule reads the same finished state (not
    fingerprinted), so switching it re-runs nothing; TAS defaults to last."""
    settings = _settings(tmp_path / 'w', generations=4)
    assert settings.winner_rule == 'best_probe' and _settings(tmp_path, (512, 1024)).winner_rule == 'last'
    result = _engine(settings, pretrained, database, tokens).run()
    state = json.loads((tmp_path / 'w' / STATE_FILE).read_text())
    probes = [state['extra']['start_probe_fitness']] + [h['probe_fitness'] for h in state['history']]
    parents = [state['extra']['start']] + [h['winner'] for h in state['history']]
    best = min(range(len(probes)), key=lambda g: (probes[g], g))
    assert result.winner_generation == best and result.winner.to_dict() == parents[best]
    assert result.probe_fitness == probes[best]
    data = json.loads((tmp_path / 'w' / WINNER_JSON).read_text())
    assert data['levels'] == parents[best] and data['winner_generation'] == best
    assert data['winner_rule'] == 'best_probe'
    last = _engine(dataclasses.replace(settings, winner='last'), pretrained, database, tokens)
    last.evaluate = lambda *a: pytest.fail('switching the winner rule re-ran a generation')
    result = last.run()
    assert result.winner.to_dict() == parents[-1] and result.winner_generation == 4
    assert result.probe_fitness == probes[-1]
    with pytest.raises(ValueError, match='best_probe picks the parent by its probe fitness'):
        _settings(tmp_path, probe_tokens=0, winner='best_probe')
    with pytest.raises(ValueError, match='winner must be one of'):
        _settings(tmp_path, winner='first')


def test_protect_units_starts_from_the_fittest_protection(pretrained, database, tokens, tmp_path):
    """protect_units: each round screens every one-unit protection of the current start through the selection's
    steps (all on the balance sample's first fitness_tokens[0] tokens, the best survivors[0] on the whole sample)
    and keeps the fittest while it beats the start (against brute force, round by round); the start keeps its
    exact size, winner.json records the moves, and a resumed search does not score them again."""
    from darwinlm_foundry.search.space import unit_protection_candidates
    from darwinlm_foundry.search.tokens import derive_seed
    spec = database.level_spec
    settings = _settings(tmp_path / 'prot', generations=0, protect_units=2, survivors=(2, 1))
    engine = _engine(settings, pretrained, database, tokens)
    sample = engine.data.sample(engine._n_seqs(1024), SEQ, derive_seed(3, 'balance'))
    part = sample[:engine._n_seqs(512)]
    assert 0 < part.shape[0] < sample.shape[0]
    config, fitness, expected, pools = uniform(2, 5), engine.config_fitness(uniform(2, 5), sample), [], []
    for _ in range(2):
        pool = unit_protection_candidates(config, engine.bounds)
        pools.append(len(pool))
        pool = sorted(pool, key=lambda row: engine.config_fitness(row[2], part))[:2]
        scored = [(engine.config_fitness(c, sample), k, u, c) for k, u, c in pool]
        best = min(scored, key=lambda row: row[0])
        if best[0] >= fitness:
            break
        expected.append((best[1], best[2], best[0]))
        fitness, config = best[0], best[3]
    assert expected  # the tiny model has a unit worth protecting, else this test would check nothing
    assert pools[0] > 2  # and the screening drops some candidates
    stored, compute = [], engine.cache.get_or_compute
    engine.cache.get_or_compute = lambda key, *a, **k: stored.append(key) or compute(key, *a, **k)
    result = engine.run()
    # the start's samples' dense targets go to a scratch file (spill_targets_mib 0), never into the cache, where
    # they stayed through every split and round (SmolLM2's full run peaked 1.2-1.5 GB above its generations)
    assert not [key for key in stored if str(key[0]).startswith('balance')]
    data = json.loads((tmp_path / 'prot' / WINNER_JSON).read_text())
    moves = data['unit_protection']['moves']
    assert [(m['kind'], m['layer']) for m in moves] == [(k, u) for k, u, _ in expected]
    assert [m['fitness'] for m in moves] == pytest.approx([f for _, _, f in expected], rel=1e-6)
    assert [m['candidates'] for m in moves] == pools[:len(moves)]
    assert data['unit_protection']['screening'] == [{'tokens': part.numel(), 'keep': 2}]
    assert LevelConfig.from_dict(data['start']) == config == result.winner
    assert result.parameters == spec.parameter_count(5)
    assert data['start_before_balance'] == uniform(2, 5).to_dict() and 'kind_balance' not in data
    resumed = _engine(dataclasses.replace(settings, generations=1), pretrained, database, tokens)
    resumed.protect_units = lambda *a: pytest.fail('a resumed search scored the protections again')
    assert resumed.run().generations == 1


def test_balance_top_protects_each_fittest_split_and_keeps_the_fittest(pretrained, database, tokens, tmp_path):
    """balance_top: the kind balance's pick and its next fittest splits are each protected on the balance
    sample, and the fittest protected start is kept (against the protections run one by one); a split that
    protects better than the pick wins, ties go to the pick; the start keeps its exact size."""
    from darwinlm_foundry.search.space import kind_balance_candidates, kind_exchange
    from darwinlm_foundry.search.tokens import derive_seed
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match='balance_top must be an integer >= 1'):
            SearchSettings(balance_top=bad)
    with pytest.raises(ValueError, match='needs balance_kinds: true and protect_units >= 1'):
        SearchSettings(balance_top=2, balance_kinds=True)
    assert 'balance_top' not in SearchSettings().result_fields()
    assert SearchSettings(balance_top=2, balance_kinds=True, protect_units=1).result_fields()['balance_top'] == 2
    spec = database.level_spec
    settings = _settings(tmp_path / 'top', generations=0, balance_kinds=True, protect_units=1, balance_top=3,
                         survivors=(2, 1))
    engine = _engine(settings, pretrained, database, tokens)
    exchange = kind_exchange(spec.per_step_parameters('attn'), spec.per_step_parameters('mlp'))
    splits = dict(kind_balance_candidates(uniform(2, 5), engine.bounds, exchange))
    sample = engine.data.sample(engine._n_seqs(1024), SEQ, derive_seed(3, 'balance'))
    fitness = {k: engine.config_fitness(c, sample) for k, c in splits.items()}
    top = sorted(fitness, key=lambda k: (fitness[k], abs(k)))[:3]
    protected = {k: engine.protect_units(splits[k], sample, fitness[k]) for k in top}
    kept = min(top, key=lambda k: protected[k][1]['fitness'])  # min keeps the first on ties, as the engine does
    result = engine.run()
    data = json.loads((tmp_path / 'top' / WINNER_JSON).read_text())
    record = data['kind_balance']
    assert record['split_shift'] == top[0] and record['shift'] == kept
    assert {int(k): v for k, v in record['protected'].items()} == pytest.approx(
        {k: p[1]['fitness'] for k, p in protected.items()}, rel=1e-6)
    assert LevelConfig.from_dict(data['start']) == protected[kept][0] == result.winner
    assert data['unit_protection']['moves'] == pytest.approx(protected[kept][1]['moves'])
    assert result.parameters == spec.parameter_count(5)

    # the choice itself: a later split whose protection is fitter wins; an equal one does not
    fitness_top0 = engine.balance_kinds(engine.start, sample)[1]['candidates']
    fitness_top0 = next(r['fitness'] for r in fitness_top0 if r['shift'] == top[0])
    def fake(gain):
        def protect(config, tokens, fitness):
            split = next(k for k, c in splits.items() if c == config)
            # split top[1] protects to the pick's own fitness minus gain (gain 0: a tie)
            return config, {'fitness': (fitness_top0 - gain) if split == top[1] else fitness, 'moves': []}
        return protect

    for gain, winner in ((0.5, top[1]), (0.0, top[0])):
        other = _engine(dataclasses.replace(settings, output_dir=str(tmp_path / f'fake{gain}'), balance_top=2),
                        pretrained, database, tokens)
        other.protect_units = fake(gain)
        record = other.balance_kinds(other.start, sample)[1]
        config, _ = other._protect_top_splits(record, sample)
        assert record['split_shift'] == top[0] and record['shift'] == winner and config == splits[winner]

    # balance_recheck_tokens with balance_top > 1: the protected finalists (not the raw splits) are scored again
    # on a fresh sample, which decides (its targets spilled to a file at spill_targets_mib 0: the same values)
    recheck = _engine(dataclasses.replace(settings, output_dir=str(tmp_path / 'recheck'), balance_top=2,
                                          balance_recheck_tokens=512, spill_targets_mib=0),
                      pretrained, database, tokens)
    again = engine.data.sample(engine._n_seqs(512), SEQ, derive_seed(3, 'balance_recheck'))
    rescored = {k: engine.config_fitness(protected[k][0], again) for k in top[:2]}
    record = recheck.balance_kinds(recheck.start, sample)[1]
    assert 'recheck' not in record  # the raw splits are not re-scored when the finalists are
    config, _ = recheck._protect_top_splits(record, sample)
    assert record['recheck']['tokens'] == 512
    assert {int(k): v for k, v in record['recheck']['fitness'].items()} == pytest.approx(rescored, rel=1e-6)
    assert record['shift'] == min(top[:2], key=rescored.__getitem__) and config == protected[record['shift']][0]
    assert not list((tmp_path / 'recheck').glob('.darwinlm_targets_*'))  # the spilled targets are gone


def test_balance_kinds_starts_from_the_fittest_exchange(pretrained, database, tokens, tmp_path):
    """balance_kinds: every start of whole attention-for-MLP exchanges is scored on the balance sample, the
    search starts from the fittest (against brute force), keeps its exact size, records the scores in
    winner.json, and a resumed search keeps that start without scoring the candidates again."""
    from darwinlm_foundry.search.space import kind_balance_candidates, kind_exchange, total_levels
    from darwinlm_foundry.search.tokens import derive_seed
    spec = database.level_spec
    exchange = kind_exchange(spec.per_step_parameters('attn'), spec.per_step_parameters('mlp'))
    assert exchange == (3, 1)  # one MHA head of 8 (Q, K, V, O rows of 80) = 2,560; 32 MLP columns = 7,680
    settings = _settings(tmp_path / 'bal', generations=1, balance_kinds=True)
    engine = _engine(settings, pretrained, database, tokens)
    candidates = dict(kind_balance_candidates(uniform(2, 5), engine.bounds, exchange))
    assert sorted(candidates) == [-3, -2, -1, 0, 1, 2]  # attention 1..16 levels in all, MLP 13..8, exact sizes
    sample = engine.data.sample(engine._n_seqs(1024), SEQ, derive_seed(3, 'balance'))
    brute = {k: engine.config_fitness(c, sample) for k, c in candidates.items()}
    result = engine.run()
    data = json.loads((tmp_path / 'bal' / WINNER_JSON).read_text())
    record = data['kind_balance']
    assert {r['shift']: r['fitness'] for r in record['candidates']} == pytest.approx(brute, rel=1e-6)
    best = min(brute, key=brute.get)
    assert record['shift'] == best != 0 and record['tokens'] == 1024
    assert LevelConfig.from_dict(data['start']) == candidates[best]
    assert data['start_before_balance'] == uniform(2, 5).to_dict()
    assert total_levels(result.winner) == total_levels(candidates[best])  # the search keeps the chosen split
    assert result.parameters == spec.parameter_count(5)
    resumed = _engine(dataclasses.replace(settings, generations=2), pretrained, database, tokens)
    resumed.balance_kinds = lambda config: pytest.fail('a resumed search scored the balance candidates again')
    assert LevelConfig.from_dict(json.loads((tmp_path / 'bal' / STATE_FILE).read_text())['extra']['start']) \
        == candidates[best]
    assert resumed.run().generations == 2
    # balance_tokens sets the sample's size (default: the last fitness step's)
    small = _engine(_settings(tmp_path / 'small', generations=0, balance_kinds=True, balance_tokens=128), pretrained,
                    database, tokens)
    assert small.balance_kinds(small.start)[1]['tokens'] == 128
    # balance_recheck_tokens: the best 3 on the first sample are scored again on a fresh one, which decides
    recheck = _engine(_settings(tmp_path / 'recheck', generations=0, balance_kinds=True, balance_recheck_tokens=512),
                      pretrained, database, tokens)
    again = engine.data.sample(engine._n_seqs(512), SEQ, derive_seed(3, 'balance_recheck'))
    top = sorted(brute, key=lambda k: (brute[k], abs(k)))[:3]
    rescored = {k: recheck.config_fitness(candidates[k], again) for k in top}
    config, record = recheck.balance_kinds(recheck.start)
    assert record['recheck']['tokens'] == 512
    assert {int(k): v for k, v in record['recheck']['fitness'].items()} == pytest.approx(rescored, rel=1e-6)
    assert record['shift'] == min(top, key=lambda k: (rescored[k], abs(k))) and config == candidates[record['shift']]
