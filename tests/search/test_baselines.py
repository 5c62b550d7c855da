"""Baselines: magnitude pruning, layer-wise OBS errors + min-error allocation, ShortGPT block influence."""

import itertools
import random

import pytest
import torch

from darwinlm_foundry.obs.calibration import collect_hessians
from darwinlm_foundry.obs.database import build_database, dense_tensor_getter
from darwinlm_foundry.search.baselines import (allocate_min_error, block_influence, layer_drop_config, magnitude_kept,
                                        unit_errors)
from darwinlm_foundry.search.space import LevelConfig, total_levels, uniform
from darwinlm_foundry.structure.levels import LevelSpec
from darwinlm_foundry.structure.shrinking import shrink_model
from darwinlm_foundry.structure.units import Unit
from tests.conftest import tiny_model

# 10 heads, 80 MLP columns in steps of 8: both kinds have remainder 0, so level 10 removes the unit.
SHAPE = dict(hidden_size=64, intermediate_size=80, num_attention_heads=10, num_key_value_heads=2, head_dim=8)
KV = {'llama_mha': 10, 'llama_gqa': 2, 'llama_bias': 2}


def _model(family='llama_gqa', seed=0):
    return tiny_model(family, seed=seed, **{**SHAPE, 'num_key_value_heads': KV[family]})


def _spec(model):
    return LevelSpec.from_config(model.config, mlp_multiple=8)


def _batches(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(n)]


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    model = _model()
    db = build_database(model, _batches(), tmp_path_factory.mktemp('db'), mlp_multiple=8)
    return model, db, collect_hessians(model, _batches())


# ------------------------------------------------------------------------------------------------
# magnitude_kept
# ------------------------------------------------------------------------------------------------
def _brute_scores(model, unit):
    """Sum of squares of each structure's own parameters, one structure at a time."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    p = f'model.layers.{unit.layer}.'
    hd, mha = 8, model.config.num_key_value_heads == model.config.num_attention_heads
    scores = []
    if unit.kind == 'attn':
        for h in range(10):
            rows = slice(h * hd, (h + 1) * hd)
            s = sd[p + 'self_attn.o_proj.weight'][:, rows].pow(2).sum()
            for proj in ['q_proj'] + (['k_proj', 'v_proj'] if mha else []):
                s += sd[f'{p}self_attn.{proj}.weight'][rows].pow(2).sum()
                if f'{p}self_attn.{proj}.bias' in sd:
                    s += sd[f'{p}self_attn.{proj}.bias'][rows].pow(2).sum()
            scores.append(float(s))
    else:
        for c in range(80):
            s = sd[p + 'mlp.down_proj.weight'][:, c].pow(2).sum()
            for proj in ('gate_proj', 'up_proj'):
                s += sd[f'{p}mlp.{proj}.weight'][c].pow(2).sum()
                if f'{p}mlp.{proj}.bias' in sd:
                    s += sd[f'{p}mlp.{proj}.bias'][c].pow(2)
            scores.append(float(s))
    return scores


@pytest.mark.parametrize('family', sorted(KV))
def test_magnitude_kept_is_top_k_of_brute_force_scores(family):
    model = _model(family)
    spec = _spec(model)
    levels = {'attn': [3, 0, 10], 'mlp': [5, 9, 0]}
    kept = magnitude_kept(model, spec, levels)
    assert set(kept) == {Unit(0, 'attn'), Unit(2, 'attn'), Unit(0, 'mlp'), Unit(1, 'mlp')}  # level-0 units left out
    assert kept[Unit(2, 'attn')] == []
    for unit, idx in kept.items():
        k = spec.keep(unit.kind, levels[unit.kind][unit.layer])
        scores = _brute_scores(model, unit)
        assert idx == sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:k])


def test_magnitude_model_has_the_stitched_uniform_size(built):
    model, db, _ = built
    spec = db.level_spec
    getter = dense_tensor_getter(model)
    for levels in (uniform(3, 3), uniform(3, 10), LevelConfig(attn=[2, 10, 7], mlp=[0, 4, 10])):
        shrunk = shrink_model(model, magnitude_kept(model, spec, levels))
        stitched = db.stitch(levels, getter)
        assert _params(shrunk) == _params(stitched) == spec.parameter_count(levels)
        assert [len(h) for h in shrunk.config.layer_heads] == [len(h) for h in stitched.config.layer_heads]
        assert shrunk.config.layer_intermediate_sizes == stitched.config.layer_intermediate_sizes


def test_magnitude_at_current_levels_is_the_identity():
    model = _model()
    spec = _spec(model)
    assert magnitude_kept(model, spec, uniform(3, 0)) == {}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(shrink_model(model, {})(ids).logits, model(ids).logits, atol=1e-6)
    # One structure less than full is a real choice: the weakest structure is the one dropped.
    kept = magnitude_kept(model, spec, {'attn': [1, 0, 0], 'mlp': [0, 0, 0]})[Unit(0, 'attn')]
    scores = _brute_scores(model, Unit(0, 'attn'))
    assert kept == [h for h in range(10) if h != min(range(10), key=scores.__getitem__)]


def test_magnitude_gradual_on_a_pruned_model():
    model = _model()
    first = shrink_model(model, magnitude_kept(model, _spec(model), uniform(3, 3)))
    spec = _spec(first)
    assert spec.current_levels == {'attn': (3, 3, 3), 'mlp': (3, 3, 3)}
    levels = {'attn': [3, 5, 10], 'mlp': [6, 3, 10]}
    kept = magnitude_kept(first, spec, levels)
    assert Unit(1, 'mlp') not in kept and all(max(i, default=-1) < 7 for u, i in kept.items() if u.kind == 'attn')
    second = shrink_model(first, kept)
    assert _params(second) == spec.parameter_count(levels)
    with pytest.raises(ValueError, match='below its current level'):
        magnitude_kept(first, spec, uniform(3, 2))


# ------------------------------------------------------------------------------------------------
# unit_errors
# ------------------------------------------------------------------------------------------------
def _output_inputs(model, batches):
    """Inputs of every o_proj / down_proj over ``batches`` (full dense forward), per unit, (tokens, in)."""
    xs, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for unit, mod in ((Unit(i, 'attn'), layer.self_attn.o_proj), (Unit(i, 'mlp'), layer.mlp.down_proj)):
            handles.append(mod.register_forward_hook(
                lambda m, a, o, u=unit: xs.setdefault(u, []).append(a[0].reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    return {u: torch.cat(v) for u, v in xs.items()}


def test_unit_errors_equal_empirical_output_error(built):
    model, db, hessians = built
    xs = _output_inputs(model, _batches())
    errors = unit_errors(db, hessians, dense_tensor_getter(model))
    # The same activations' Hessians in float64: the identity then holds to rounding.
    exact = unit_errors(db, {u: 2 * X.T @ X / X.shape[0] for u, X in xs.items()}, dense_tensor_getter(model))
    spec = db.level_spec
    assert set(errors) == set(db.units)
    for unit in db.units:
        assert sorted(errors[unit]) == list(range(11)) and errors[unit][0] == exact[unit][0] == 0.0
        X = xs[unit]
        W = (model.model.layers[unit.layer].self_attn.o_proj if unit.kind == 'attn'
             else model.model.layers[unit.layer].mlp.down_proj).weight.double()
        energy = float((X @ W.T).pow(2).sum() * 2 / X.shape[0])
        g = spec.structure_size(unit.kind)
        for level in range(1, 11):
            kept = db.kept(unit, level)
            Wp = torch.zeros_like(W)
            if kept.numel():
                cols = (kept[:, None] * g + torch.arange(g)).reshape(-1)
                Wp[:, cols] = db.weight(unit, level).double()
            empirical = float(((X @ W.T - X @ Wp.T) ** 2).sum() * 2 / X.shape[0])
            assert exact[unit][level] == pytest.approx(empirical, rel=1e-9), (unit, level)
            # The stored fp32 Hessian: compensated errors are tiny differences of large terms, so the
            # tolerance is relative to the unit's output energy.
            assert errors[unit][level] == pytest.approx(empirical, rel=1e-4, abs=1e-6 * energy), (unit, level)
            assert errors[unit][level] > 0
        # Level 10 removes everything: the error is the whole output energy.
        assert errors[unit][10] == pytest.approx(energy, rel=1e-5)


def test_unit_errors_from_model_equal_from_getter(built):
    model, db, hessians = built
    a = unit_errors(db, hessians, model)
    b = unit_errors(db, {u: s.hessian for u, s in hessians.items()}, dense_tensor_getter(model))
    assert a == b


# ------------------------------------------------------------------------------------------------
# allocate_min_error
# ------------------------------------------------------------------------------------------------
def _brute_force(errors, layers, kind, total, lo, hi):
    best = None
    options = [[l for l in errors[Unit(i, kind)] if lo <= l <= hi] for i in range(layers)]
    for combo in itertools.product(*options):
        if sum(combo) != total:
            continue
        err = sum(errors[Unit(i, kind)][l] for i, l in enumerate(combo))
        if best is None or err < best[0]:
            best = (err, list(combo))
    return best


@pytest.mark.parametrize('seed', range(6))
def test_allocate_min_error_equals_brute_force(seed):
    rng = random.Random(seed)
    layers = 3 + seed % 2
    errors = {}
    for kind in ('attn', 'mlp'):
        for i in range(layers):
            levels = [l for l in range(6) if l == 0 or rng.random() > 0.2]  # some levels missing
            errors[Unit(i, kind)] = {l: rng.random() * (1 + l) ** 2 for l in levels}
    min_level, max_level = (0, None) if seed < 3 else (1, 4)
    hi = 5 if max_level is None else max_level
    for target in (1, 2, 2.5, 3):
        total = layers * target
        if total != int(total):
            continue
        want = {k: _brute_force(errors, layers, k, int(total), min_level, hi) for k in ('attn', 'mlp')}
        if any(w is None for w in want.values()):
            with pytest.raises(ValueError):
                allocate_min_error(errors, layers, target, max_level=max_level, min_level=min_level)
            continue
        got = allocate_min_error(errors, layers, target, max_level=max_level, min_level=min_level)
        assert total_levels(got) == {'attn': total, 'mlp': total}
        for kind in ('attn', 'mlp'):
            levels = list(got.group(kind))
            assert all(min_level <= l <= hi and l in errors[Unit(i, kind)] for i, l in enumerate(levels))
            err = sum(errors[Unit(i, kind)][l] for i, l in enumerate(levels))
            assert err == pytest.approx(want[kind][0], rel=1e-12)
            assert levels == want[kind][1]


def test_allocate_min_error_infeasible():
    errors = {Unit(i, k): {0: 0.0, 5: 1.0} for i in range(2) for k in ('attn', 'mlp')}
    with pytest.raises(ValueError, match='no allocation'):
        allocate_min_error(errors, 2, 1.5)  # sum 3 is inside [0, 10] but levels {0, 5} cannot reach it
    with pytest.raises(ValueError, match='infeasible'):
        allocate_min_error(errors, 2, 6)
    with pytest.raises(ValueError, match='no error for any level'):
        allocate_min_error(errors, 2, 1, min_level=1, max_level=4)
    with pytest.raises(ValueError, match='whole number'):
        allocate_min_error(errors, 2, 1.25)
    with pytest.raises(ValueError, match='no error for any level'):
        allocate_min_error({u: e for u, e in errors.items() if u.kind == 'attn'}, 2, 0)


def test_allocate_on_database_errors_beats_uniform(built):
    model, db, hessians = built
    errors = unit_errors(db, hessians, model)
    spec = db.level_spec
    cap = min(spec.max_exact_level('attn'), spec.max_exact_level('mlp'))
    assert cap == 9  # remainder 0: level 10 removes and frees the norm, so it is excluded
    config = allocate_min_error(errors, 3, 4, max_level=cap)
    assert total_levels(config) == total_levels(uniform(3, 4))
    assert spec.parameter_count(config) == spec.parameter_count(uniform(3, 4))

    def cost(c):
        return sum(errors[Unit(i, k)][l] for k, i, l in c.items())

    assert cost(config) <= cost(uniform(3, 4)) + 1e-12


# ------------------------------------------------------------------------------------------------
# block_influence / layer_drop_config
# ------------------------------------------------------------------------------------------------
def test_block_influence_matches_hidden_states():
    model = _model()
    batches = _batches(1, n=2)
    model.train()
    bi = block_influence(model, batches)
    assert model.training  # mode restored
    model.eval()
    cos = [0.0] * 3
    n = 0
    with torch.no_grad():
        for ids in batches:
            hs = model(ids, output_hidden_states=True).hidden_states
            n += ids.numel()
            for i in range(2):  # hidden_states[3] has the final norm applied: not the last layer's output
                cos[i] += float(torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), -1).sum())
    assert len(bi) == 3
    for i in range(2):
        assert bi[i] == pytest.approx(1 - cos[i] / n, abs=1e-9)
    # A dict batch with a full attention mask is the same batch.
    assert block_influence(model, [{'input_ids': b, 'attention_mask': torch.ones_like(b)} for b in batches]) == \
        pytest.approx(bi, abs=1e-12)


def test_block_influence_of_an_identity_layer_is_zero():
    model = _model()
    last = model.model.layers[2]
    with torch.no_grad():  # zero outputs of both sublayers: the layer passes its input through
        last.self_attn.o_proj.weight.zero_()
        last.mlp.down_proj.weight.zero_()
    bi = block_influence(model, _batches(2))
    assert abs(bi[2]) < 1e-12 and bi[0] > 1e-3 and bi[1] > 1e-3


def test_layer_drop_config_places_drops_and_remainder():
    influence = [0.3, 0.1, 0.5, 0.2, 0.4]
    config = layer_drop_config(influence, 3)  # total 15: drop layer 1, 5 levels on layer 3
    assert config.attn == config.mlp == (0, 10, 0, 5, 0)
    assert total_levels(config) == total_levels(uniform(5, 3))
    assert layer_drop_config(influence, 4).attn == (0, 10, 0, 10, 0)  # total 20: two drops, no remainder
    assert layer_drop_config(influence, 0).attn == (0,) * 5
    assert layer_drop_config(influence, 10).attn == (10,) * 5
    assert layer_drop_config([0.2, 0.1, 0.1], 4).attn == (0, 10, 2)  # ties: lower layer dropped first
    assert layer_drop_config([0.2, 0.1, 0.3, 0.4], 2.5, max_level=5).attn == (5, 5, 0, 0)
    with pytest.raises(ValueError, match='whole number'):
        layer_drop_config(influence, 2.3)
    with pytest.raises(ValueError, match='outside'):
        layer_drop_config(influence, 11)


def test_layer_drop_size_differs_by_removal_overhead(built):
    model, db, _ = built
    spec = db.level_spec
    config = layer_drop_config(block_influence(model, _batches()), 4)  # total 12: one drop, 2 levels elsewhere
    assert sorted(config.attn) == [0, 2, 10]
    dropped = db.stitch(config, dense_tensor_getter(model))
    assert _params(dropped) == spec.parameter_count(config)
    overhead = spec.removal_overhead('attn') + spec.removal_overhead('mlp')
    assert spec.parameter_count(uniform(3, 4)) - spec.parameter_count(config) == overhead
    assert spec.removal_overhead('mlp') == 64  # MLP without bias: just its RMSNorm
    # Block influence also runs on a shrunk model whose dropped layer has no attention and no MLP left.
    bi = block_influence(dropped, _batches())
    assert bi[config.attn.index(10)] == pytest.approx(0.0, abs=1e-12)
