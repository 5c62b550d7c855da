"""Levels computed from configs: equal steps, exactly size-neutral switches, exact parameter counts."""

import itertools
import json

import pytest
import torch
import transformers

from darwinlm_foundry.search.space import LevelConfig
from darwinlm_foundry.structure.levels import LevelSpec, normalise_levels, parameter_count
from darwinlm_foundry.structure.shrinking import parameter_count as shrunk_parameter_count
from darwinlm_foundry.structure.shrinking import shrink_model, shrunk_config
from darwinlm_foundry.structure.units import Unit
from tests.conftest import tiny_model


def _config(heads, kv, mlp, family='llama', hidden=None, layers=2, **kw):
    cls = {'llama': transformers.LlamaConfig, 'qwen2': transformers.Qwen2Config,
           'mistral': transformers.MistralConfig}[family]
    hidden = hidden or heads * 16
    if family == 'mistral':
        kw.setdefault('sliding_window', None)
    return cls(vocab_size=1000, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=16, tie_word_embeddings=False, **kw)


AWKWARD = [  # (heads, kv heads, MLP columns, family)
    (12, 4, 11008, 'llama'), (32, 32, 11008, 'llama'), (32, 8, 14336, 'llama'), (40, 8, 13824, 'qwen2'),
    (40, 40, 128 * 25, 'llama'), (12, 12, 128 * 7, 'mistral'), (32, 8, 128 * 10, 'qwen2'),
]


@pytest.mark.parametrize('heads,kv,mlp,family', AWKWARD)
def test_equal_steps_and_every_switch_is_size_neutral(heads, kv, mlp, family):
    spec = LevelSpec.from_config(_config(heads, kv, mlp, family))
    for kind, n in (('attn', heads), ('mlp', mlp)):
        step = spec.step[kind]
        assert step > 0 and step % (32 if kind == 'mlp' else 1) == 0 and 10 * step <= n
        assert n - 10 * step < 10 * (32 if kind == 'mlp' else 1)  # the largest such step
        keeps = [spec.keep(kind, l) for l in range(11)]
        assert keeps[0] == n and all(a - b == step for a, b in zip(keeps, keeps[1:]))
    base = spec.parameter_count(0)
    for kind in ('attn', 'mlp'):
        top = spec.max_exact_level(kind)
        other = 'mlp' if kind == 'attn' else 'attn'
        # unit 0 goes up a level, unit 1 goes down a level: every pair of levels, exhaustively
        for a, b in itertools.product(range(11), range(11)):
            if a == 10 or b == 0:
                continue
            before = {kind: [a, b], other: [3, 7]}
            after = {kind: [a + 1, b - 1], other: [3, 7]}
            delta = spec.parameter_count(after) - spec.parameter_count(before)
            if max(a + 1, b) <= top:
                assert delta == 0, (kind, a, b)
            else:  # only switches into / out of full removal, and only when the top level removes
                assert spec.remainder(kind) == 0
                assert delta == -spec.removal_overhead(kind) * ((a + 1 == 10) - (b == 10))
        assert (top == 10) == (spec.remainder(kind) > 0)
    assert base == shrunk_parameter_count(_config(heads, kv, mlp, family))


@pytest.mark.parametrize('heads,kv,mlp,family', AWKWARD)
def test_closed_form_matches_shrunk_config_count(heads, kv, mlp, family):
    config = _config(heads, kv, mlp, family, layers=3)
    spec = LevelSpec.from_config(config)
    g = torch.Generator().manual_seed(heads + mlp)
    for _ in range(4):
        levels = {k: torch.randint(0, 11, (3,), generator=g).tolist() for k in ('attn', 'mlp')}
        kept = {}
        for kind in ('attn', 'mlp'):
            for layer, level in enumerate(levels[kind]):
                n = spec.keep(kind, level)
                kept[Unit(layer, kind)] = torch.randperm(spec.dense[kind], generator=g)[:n].tolist()
        assert spec.parameter_count(levels) == shrunk_parameter_count(shrunk_config(config, kept))


@pytest.mark.parametrize('family', ['llama_mha', 'llama_gqa', 'llama_bias', 'mistral', 'qwen2'])
def test_counts_match_real_shrunk_models(family):
    model = tiny_model(family, num_attention_heads=10, num_key_value_heads=10 if family == 'llama_mha' else 2,
                       hidden_size=80, head_dim=8, intermediate_size=352)
    spec = LevelSpec.from_config(model.config)
    assert spec.parameter_count(0) == sum(p.numel() for p in model.parameters())
    for levels in ({'attn': [10, 4, 0], 'mlp': [0, 10, 9]}, {'attn': [1, 2, 3], 'mlp': [5, 5, 5]}):
        kept = {Unit(l, k): list(range(spec.keep(k, lv))) for k in levels for l, lv in enumerate(levels[k])}
        shrunk = shrink_model(model, kept)
        assert sum(p.numel() for p in shrunk.parameters()) == spec.parameter_count(levels)


def test_too_few_structures_is_a_clear_error_and_num_levels_adapts():
    config = _config(4, 2, 128)
    with pytest.raises(ValueError, match='4 query heads cannot be split into 10 equal'):
        LevelSpec.from_config(config, num_levels=10)
    spec = LevelSpec.from_config(config)  # automatic: min(10, 4 heads, 128 // 32) = 4 levels
    assert spec.num_levels == 4 and spec == LevelSpec.from_config(config, num_levels=4)
    assert [spec.keep('attn', l) for l in range(5)] == [4, 3, 2, 1, 0]
    assert [spec.keep('mlp', l) for l in range(5)] == [128, 96, 64, 32, 0]
    with pytest.raises(ValueError, match='outside 0..4'):
        spec.keep('attn', 5)
    spec8 = LevelSpec.from_config(_config(10, 2, 96), mlp_multiple=8)
    assert spec8.step == {'attn': 1, 'mlp': 8} and spec8.remainder('mlp') == 16


def test_gradual_mode_keeps_original_steps_and_reports_current_levels():
    from darwinlm_foundry.structure.shrinking import to_darwinlm_config
    dense = _config(32, 8, 11008, layers=3)
    spec = LevelSpec.from_config(dense)
    assert spec.steps == {'attn': 3, 'mlp': 1088}
    pruned = to_darwinlm_config(dense)
    pruned.layer_heads = [list(range(32 - 3 * 5)), list(range(2)), list(range(32))]
    pruned.layer_intermediate_sizes = [11008 - 1088 * 5, 11008 - 1088 * 6, 128]
    g = LevelSpec.from_config(pruned)  # steps recomputed from the dense sizes the config keeps
    assert g.steps == spec.steps and g.current_levels == {'attn': (5, 10, 0), 'mlp': (5, 6, 10)}
    assert g.levels_available('attn', 0) == list(range(5, 11))
    assert g.keep_counts('mlp', 1) == [11008 - 1088 * l for l in range(6, 11)]
    assert g.current_parameter_count() == shrunk_parameter_count(pruned)
    assert 'current model' in g.report() and '[5, 10, 0]' in g.report()
    pruned.layer_intermediate_sizes[0] -= 32  # off the grid of the steps
    with pytest.raises(ValueError, match='not a level of step 1088'):
        LevelSpec.from_config(pruned)
    pruned.level_steps = {'attn': 3, 'mlp': 1056}  # recorded steps (another mlp_multiple) win
    pruned.layer_intermediate_sizes = [11008 - 1056 * 5, 11008 - 1056 * 6, 11008 - 1056 * 10]
    assert LevelSpec.from_config(pruned).current_levels['mlp'] == (5, 6, 10)
    assert LevelSpec.from_config(pruned).step['mlp'] == 1056


def test_report_round_trip_and_level_formats():
    spec = LevelSpec.from_config(_config(40, 8, 13824, 'qwen2', hidden=5120, layers=4))
    text = spec.report()
    assert f'{spec.parameter_count(5):,}' in text and 'attn level 10 removes the unit' in text
    again = LevelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    lc = LevelConfig(attn=[1, 2, 3, 4], mlp=[5, 6, 7, 8])
    by_unit = {Unit(i, k): lv for k in ('attn', 'mlp') for i, lv in enumerate(lc.group(k))}
    assert spec.parameter_count(lc) == spec.parameter_count(by_unit) == parameter_count(spec, lc.to_dict())
    with pytest.raises(ValueError, match='missing for units'):
        normalise_levels({Unit(0, 'attn'): 1}, 4)
    assert parameter_count(_config(40, 8, 13824), 0) == shrunk_parameter_count(_config(40, 8, 13824))


SMOLLM2 = dict(heads=9, kv=3, mlp=1536, hidden=576, layers=30)  # SmolLM2-135M's real shapes


def _smollm2_config(layers=SMOLLM2['layers']):
    return transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                    num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                    tie_word_embeddings=True)


def test_few_head_gqa_model_gets_levels_automatically_and_switches_stay_exact():
    """SmolLM2-135M (9 query heads / 3 K/V heads): 9 levels of one head, level 5 is about half the blocks."""
    spec = LevelSpec.from_config(_smollm2_config())
    assert spec.num_levels == 9 and spec.steps == {'attn': 1, 'mlp': 160}
    assert [spec.keep('attn', l) for l in range(10)] == list(range(9, -1, -1))
    assert spec.keep('mlp', 5) == 1536 - 800 and spec.remainder('mlp') == 96
    block = lambda level: spec.unit_parameters('attn', level) + spec.unit_parameters('mlp', level)
    assert 0.45 < block(5) / block(0) < 0.55  # comparable to the paper's level 5 of 10
    assert spec.parameter_count(0) == shrunk_parameter_count(_smollm2_config())
    # every level switch between two units of a kind is size-neutral below removal (attention removal also
    # frees the GQA K/V, so it stops at 8 for an exact search; MLP level 9 keeps 96 columns)
    assert spec.max_exact_level('attn') == 8 and spec.max_exact_level('mlp') == 9
    rest = {'attn': [5] * 28, 'mlp': [5] * 28}
    for kind in ('attn', 'mlp'):
        top = spec.max_exact_level(kind)
        for a, b in itertools.product(range(top), range(1, top + 1)):
            levels = {k: [a, b] + rest[k] if k == kind else [5, 5] + rest[k] for k in ('attn', 'mlp')}
            moved = {k: [a + 1, b - 1] + rest[k] if k == kind else [5, 5] + rest[k] for k in ('attn', 'mlp')}
            assert spec.parameter_count(levels) == spec.parameter_count(moved)


def test_pruned_few_head_model_records_its_levels_and_reopens_for_gradual_pruning(tmp_path):
    """A pruned SmolLM2-shaped model saved and re-loaded gives the same LevelSpec (database of a pruned model)."""
    from darwinlm_foundry.modeling import DarwinLMConfig
    from darwinlm_foundry.structure.shrinking import to_darwinlm_config
    config = _smollm2_config(layers=3)
    spec = LevelSpec.from_config(config)
    pruned = to_darwinlm_config(config)
    pruned.layer_heads = [list(range(9 - 5)), list(range(9 - 6)), list(range(9))]
    pruned.layer_intermediate_sizes = [1536 - 160 * 5, 1536 - 160 * 9, 1536]
    pruned.level_steps, pruned.num_levels = spec.steps, spec.num_levels
    pruned.save_pretrained(tmp_path)
    again = LevelSpec.from_config(DarwinLMConfig.from_pretrained(tmp_path))
    assert again.num_levels == 9 and again.steps == spec.steps
    assert again.current_levels == {'attn': (5, 6, 0), 'mlp': (5, 9, 0)}
    assert again.levels_available('attn', 1) == [6, 7, 8, 9]
    # a config written before num_levels was recorded derives the same number from the dense sizes
    pruned.num_levels = None
    assert LevelSpec.from_config(pruned) == again


def test_finer_mlp_levels_keep_the_nominal_sizes_and_switches_exact(tmp_path):
    """mlp_split=2 on SmolLM2: MLP steps of 80 columns, MLP level 2L keeps what level L kept, sizes unchanged."""
    from darwinlm_foundry.modeling import DarwinLMConfig
    from darwinlm_foundry.structure.shrinking import to_darwinlm_config
    coarse = LevelSpec.from_config(_smollm2_config())
    fine = LevelSpec.from_config(_smollm2_config(), mlp_split=2)
    assert fine.steps == {'attn': 1, 'mlp': 80} and fine.top('attn') == 9 and fine.top('mlp') == 18
    assert [fine.keep('mlp', 2 * l) for l in range(10)] == [coarse.keep('mlp', l) for l in range(10)]
    assert fine.keep('mlp', 11) == 1536 - 880 and fine.remainder('mlp') == 96
    for level in range(10):  # an int is a nominal level: the same model size
        assert fine.parameter_count(level) == coarse.parameter_count(level)
        assert fine.uniform_levels(level) == {'attn': [level] * 30, 'mlp': [2 * level] * 30}
    assert fine.max_exact_level('mlp') == 18 and fine.max_exact_level('attn') == 8
    rest = [10] * 28
    for a, b in itertools.product(range(18), range(1, 19)):  # every fine MLP switch is size-neutral
        assert fine.parameter_count({'attn': [5] * 30, 'mlp': [a, b] + rest}) == \
            fine.parameter_count({'attn': [5] * 30, 'mlp': [a + 1, b - 1] + rest})
    with pytest.raises(ValueError, match='outside 0..18'):
        fine.keep('mlp', 19)
    with pytest.raises(ValueError, match='cannot be split into 3'):
        LevelSpec.from_config(_smollm2_config(), mlp_split=3)  # 160 columns do not split in 3
    with pytest.raises(ValueError, match='1..4'):
        LevelSpec.from_config(_smollm2_config(), mlp_split=5)
    # the dict form: a split is recorded, the default is left out (older manifests read back unchanged)
    assert LevelSpec.from_dict(fine.to_dict()) == fine and 'mlp_split' not in coarse.to_dict()
    assert LevelSpec.from_dict(coarse.to_dict()) == coarse
    # a pruned model records the split next to its steps and re-opens with it (gradual pruning)
    config = _smollm2_config(layers=3)
    pruned = to_darwinlm_config(config)
    pruned.layer_heads = [list(range(9 - 5)), list(range(9 - 6)), list(range(9))]
    pruned.layer_intermediate_sizes = [1536 - 80 * 11, 1536 - 80 * 18, 1536]
    pruned.level_steps, pruned.num_levels, pruned.mlp_level_split = fine.steps, 9, 2
    pruned.save_pretrained(tmp_path)
    again = LevelSpec.from_config(DarwinLMConfig.from_pretrained(tmp_path))
    assert again.mlp_split == 2 and again.current_levels == {'attn': (5, 6, 0), 'mlp': (11, 18, 0)}
    assert again.levels_available('mlp', 0) == list(range(11, 19))
    with pytest.raises(ValueError, match='mlp_level_split=2'):
        LevelSpec.from_config(pruned, mlp_split=1)
