"""Tests of the pure cores of the evolutionary search: search space, selection, fitness, search state.

Fast and model-free: synthetic fitness tables stand in for fine-tuning + KL.
"""

import hashlib
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from darwinlm_foundry.search.fitness import (DenseLogitCache, DenseTargets, SpilledTargets, kl_divergence,
                                      next_token_labels, prepare_logits, score_tokens, token_nll, topk_kl)
from darwinlm_foundry.search.selection import PARENT, SelectionSchedule, rank, run_generation
from darwinlm_foundry.search.space import (GROUPS, LevelBounds, LevelConfig, admits_switch,
                                           assert_same_size, make_offspring, make_rng, mutate, num_switches,
                                           rng_from_state, rng_state, spread_extra_levels, total_levels, uniform)
from darwinlm_foundry.search.state import (SearchState, SearchStateError, best_probe_generation, run_search,
                                           settings_fingerprint)


# ==================================================================================================
# Search space
# ==================================================================================================
def random_config(rng: random.Random, num_layers: int, bounds: LevelBounds) -> LevelConfig:
    return LevelConfig(**{
        g: [rng.randint(lo, hi) for lo, hi in zip(bounds.lower.group(g), bounds.upper.group(g))] for g in GROUPS})


def test_level_config_validates_and_hashes():
    a = LevelConfig(attn=[1, 2], mlp=[3, 4])
    assert a == LevelConfig(attn=(1, 2), mlp=(3, 4)) and hash(a) == hash(LevelConfig((1, 2), (3, 4)))
    assert len({a, LevelConfig((1, 2), (3, 4)), LevelConfig((2, 1), (3, 4))}) == 2
    with pytest.raises(ValueError, match='0..10'):
        LevelConfig(attn=[11, 0], mlp=[0, 0])
    with pytest.raises(ValueError, match='0..10'):
        LevelConfig(attn=[-1, 0], mlp=[0, 0])
    with pytest.raises(ValueError, match='one level per layer'):
        LevelConfig(attn=[1], mlp=[1, 2])
    with pytest.raises(ValueError, match='integer'):
        LevelConfig(attn=[1.5, 2], mlp=[1, 2])
    with pytest.raises(ValueError, match='unknown'):
        LevelConfig.from_dict({'attn': [1], 'mlp': [1], 'emb': [0]})
    assert total_levels(a) == {'attn': 3, 'mlp': 7}


def test_json_and_text_round_trip():
    cfg = LevelConfig(attn=[0, 5, 10], mlp=[7, 3, 5])
    assert LevelConfig.from_json(cfg.to_json()) == cfg
    text = cfg.to_text()
    # The research scripts' layout: MLP group, then attention, `name: level`, no trailing newline.
    assert text.splitlines() == [
        'model.layers.0.mlp.down_proj: 7', 'model.layers.1.mlp.down_proj: 3', 'model.layers.2.mlp.down_proj: 5',
        'model.layers.0.self_attn.o_proj: 0', 'model.layers.1.self_attn.o_proj: 5',
        'model.layers.2.self_attn.o_proj: 10']
    assert not text.endswith('\n')
    assert LevelConfig.from_text(text) == cfg
    # Any order, odd spacing, a trailing newline and comments are read too.
    shuffled = '\n'.join(reversed(text.splitlines())).replace(': ', ':  ') + '\n# end\n'
    assert LevelConfig.from_text(shuffled) == cfg
    with pytest.raises(ValueError, match='missing for layers'):
        LevelConfig.from_text('\n'.join(text.splitlines()[1:]))
    with pytest.raises(ValueError, match='matches neither'):
        LevelConfig.from_text(text + '\nmodel.layers.0.mlp.up_proj: 3')
    with pytest.raises(ValueError, match='twice'):
        LevelConfig.from_text(text + '\nmodel.layers.0.mlp.down_proj: 3')
    custom = cfg.to_text(attn_template='blocks.{layer}.attn', mlp_template='blocks.{layer}.ffn')
    assert LevelConfig.from_text(custom, attn_template='blocks.{layer}.attn', mlp_template='blocks.{layer}.ffn') == cfg


def test_assert_same_size():
    a = LevelConfig(attn=[5, 5], mlp=[5, 5])
    assert_same_size(a, LevelConfig(attn=[4, 6], mlp=[6, 4]))
    with pytest.raises(ValueError, match='differ in size'):
        assert_same_size(a, LevelConfig(attn=[4, 5], mlp=[6, 5]))  # a level moved across groups
    with pytest.raises(ValueError, match='differ in size'):
        assert_same_size(a, LevelConfig(attn=[5, 5], mlp=[5, 6]))


def test_num_switches_distribution():
    rng = make_rng(0)
    counts = np.bincount([num_switches(rng) for _ in range(9000)], minlength=4)
    assert counts[0] == 0
    np.testing.assert_allclose(counts[1:] / 9000, [5 / 9, 3 / 9, 1 / 9], atol=0.02)


@pytest.mark.parametrize('m', [1, 6])
def test_num_switches_distribution_for_other_maxima(m):
    """min of two U{1,m}: P(k) = ((m - k + 1)^2 - (m - k)^2) / m^2."""
    rng = make_rng(0)
    counts = np.bincount([num_switches(rng, m) for _ in range(20000)], minlength=m + 2)
    want = [((m - k + 1) ** 2 - (m - k) ** 2) / m ** 2 for k in range(1, m + 1)]
    assert counts[0] == counts[m + 1] == 0
    np.testing.assert_allclose(counts[1:m + 1] / 20000, want, atol=0.015)
    with pytest.raises(ValueError, match='max_switches'):
        num_switches(rng, 0)


def test_offspring_with_one_switch_at_most_move_exactly_one_level_pair():
    """``max_switches=1`` reaches make_offspring's mutations: every child is one switch from the parent (the
    default makes some with two or three)."""
    bounds, parent = LevelBounds.full(6), uniform(6, 5)
    moved = lambda c: sum(int(np.abs(np.subtract(c.group(g), parent.group(g))).sum()) for g in GROUPS)
    assert {moved(c) for c in make_offspring(parent, 40, bounds, make_rng(4), max_switches=1)} == {2}
    assert max(moved(c) for c in make_offspring(parent, 40, bounds, make_rng(4))) > 2


@pytest.mark.parametrize('bounds_kind', ['full', 'custom'])
def test_mutation_keeps_size_groups_and_bounds(bounds_kind):
    num_layers = 6
    py = random.Random(1)
    rng = make_rng(2)
    if bounds_kind == 'full':
        bounds = LevelBounds.full(num_layers)
    else:
        lower = LevelConfig(attn=[0, 3, 5, 2, 4, 4], mlp=[1, 1, 6, 2, 0, 7])
        upper = LevelConfig(attn=[2, 9, 5, 6, 10, 4], mlp=[8, 2, 9, 3, 10, 7])
        bounds = LevelBounds(lower, upper)
    for _ in range(60):
        parent = random_config(py, num_layers, bounds)
        if not admits_switch(parent, bounds):
            continue
        for _ in range(40):
            child = mutate(parent, bounds, rng)
            assert total_levels(child) == total_levels(parent)  # per group: never crosses groups
            assert bounds.contains(child), bounds.violations(child)
            for g in GROUPS:
                diff = np.subtract(child.group(g), parent.group(g))
                # At most 3 switches, each moves one level: at most 3 ups and 3 downs of 1 unit each per group.
                assert np.abs(diff).sum() <= 6
            total_moved = sum(np.abs(np.subtract(child.group(g), parent.group(g))).sum() for g in GROUPS)
            assert total_moved <= 6


def test_single_switch_moves_one_level_between_two_units_of_one_group():
    bounds = LevelBounds.full(4)
    parent = LevelConfig(attn=[0, 10, 5, 3], mlp=[10, 10, 0, 7])
    rng = make_rng(3)
    changed_groups = set()
    for _ in range(300):
        child = mutate(parent, bounds, rng, n_switches=1)
        diffs = {g: np.subtract(child.group(g), parent.group(g)) for g in GROUPS}
        moved = [g for g in GROUPS if diffs[g].any()]
        assert len(moved) == 1
        d = diffs[moved[0]]
        assert sorted(d[d != 0].tolist()) == [-1, 1]  # two different units, one up and one down
        changed_groups.add(moved[0])
    assert changed_groups == set(GROUPS)


def test_mutation_only_uses_groups_that_admit_a_switch():
    lower = LevelConfig(attn=[5, 5, 5], mlp=[0, 0, 0])
    upper = LevelConfig(attn=[5, 5, 5], mlp=[10, 10, 10])  # attention frozen
    bounds = LevelBounds(lower, upper)
    parent = LevelConfig(attn=[5, 5, 5], mlp=[5, 5, 5])
    rng = make_rng(4)
    for _ in range(100):
        child = mutate(parent, bounds, rng)
        assert child.attn == parent.attn and total_levels(child) == total_levels(parent)
    frozen = LevelBounds(parent, parent)
    assert not admits_switch(parent, frozen)
    with pytest.raises(ValueError, match='no level switch is possible'):
        mutate(parent, frozen, rng)
    with pytest.raises(ValueError, match='outside the level bounds'):
        mutate(LevelConfig(attn=[4, 5, 5], mlp=[5, 5, 5]), bounds, rng)


def test_make_offspring_distinct_and_never_parent():
    bounds = LevelBounds.full(4)
    parent = uniform(4, 5)
    rng = make_rng(5)
    kids = make_offspring(parent, 16, bounds, rng)
    assert len(kids) == 16 and len(set(kids)) == 16 and parent not in kids
    for kid in kids:
        assert_same_size(kid, parent)
        assert bounds.contains(kid)


def test_make_offspring_small_space_returns_fewer_with_warning():
    # attention can only swap its two levels; MLP is frozen: exactly one other configuration exists.
    bounds = LevelBounds(LevelConfig(attn=[4, 4], mlp=[5, 5]), LevelConfig(attn=[5, 5], mlp=[5, 5]))
    parent = LevelConfig(attn=[4, 5], mlp=[5, 5])
    with pytest.warns(RuntimeWarning, match='only 1 of 16'):
        kids = make_offspring(parent, 16, bounds, make_rng(6), max_tries=200)
    assert kids == [LevelConfig(attn=[5, 4], mlp=[5, 5])]
    with pytest.warns(RuntimeWarning, match='no level switch'):
        assert make_offspring(parent, 4, LevelBounds(parent, parent), make_rng(6)) == []


@pytest.mark.parametrize('kind', ['numpy', 'python'])
def test_rng_state_round_trip_through_json(kind):
    bounds = LevelBounds.full(8)
    parent = uniform(8, 5)
    rng = make_rng(7, kind)
    make_offspring(parent, 5, bounds, rng)
    saved = json.loads(json.dumps(rng_state(rng)))
    expected = make_offspring(parent, 16, bounds, rng)
    assert make_offspring(parent, 16, bounds, rng_from_state(saved)) == expected


def test_spread_extra_levels():
    start = LevelConfig(attn=[5, 4, 6, 9, 5, 5, 5, 5], mlp=[5, 5, 5, 5, 3, 7, 5, 10])
    bounds = LevelBounds.starting_at(start)
    out = spread_extra_levels(start, 1, bounds, make_rng(8))
    assert total_levels(out) == {g: s + 8 for g, s in total_levels(start).items()}
    assert bounds.contains(out)  # no unit below its start level, none above 10
    assert out == spread_extra_levels(start, 1, bounds, make_rng(8))  # seeded
    assert out != spread_extra_levels(start, 1, bounds, make_rng(9))
    per_group = spread_extra_levels(start, {'attn': 0.5, 'mlp': 0}, bounds, make_rng(8))
    assert total_levels(per_group) == {'attn': total_levels(start)['attn'] + 4, 'mlp': total_levels(start)['mlp']}
    capped = LevelBounds(start, LevelConfig(attn=[6, 5, 7, 9, 6, 6, 6, 6], mlp=[10] * 8))
    out = spread_extra_levels(start, 7 / 8, capped, make_rng(1))  # attention has exactly 7 levels of room
    assert out.attn == capped.upper.attn
    with pytest.raises(ValueError, match='upper bound'):
        spread_extra_levels(start, 1, capped, make_rng(1))
    with pytest.raises(ValueError, match='whole number'):
        spread_extra_levels(start, 0.3, bounds, make_rng(1))


@pytest.mark.parametrize('shape, exchange', [
    # SmolLM2-135M: a head of 64 (Q and O rows; GQA K/V stay) = 73,728, an MLP step of 160 columns = 276,480
    (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
          num_key_value_heads=3), (15, 4)),
    # Llama-2-7B: 3 MHA heads (Q, K, V and O) = 6,291,456, an MLP step of 1088 columns = 13,369,344
    (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
          num_key_value_heads=32), (17, 8)),
])
def test_kind_balance_candidates_keep_the_size_exactly(shape, exchange):
    """Against brute force: the exchange is the smallest equal-cost pair of level counts; every candidate has the
    start's parameter count exactly, stays in the bounds, moves k whole exchanges, and the list stops exactly
    where one more exchange no longer fits; an even start stays even."""
    import transformers

    from darwinlm_foundry.search.space import kind_balance_candidates, kind_exchange, shift_group
    from darwinlm_foundry.structure.levels import LevelSpec
    spec = LevelSpec.from_config(transformers.LlamaConfig(vocab_size=1000, tie_word_embeddings=True, **shape))
    pa, pm = spec.per_step_parameters('attn'), spec.per_step_parameters('mlp')
    assert kind_exchange(pa, pm) == exchange
    a, m = exchange
    assert a * pa == m * pm and not any(x * pa % pm == 0 for x in range(1, a))  # smallest
    n = spec.num_layers
    bounds = LevelBounds(uniform(n, 0), LevelConfig(attn=[spec.max_exact_level('attn')] * n,
                                                    mlp=[spec.max_exact_level('mlp')] * n))
    start = uniform(n, 5)
    found = kind_balance_candidates(start, bounds, exchange)
    shifts = [k for k, _ in found]
    assert shifts == list(range(shifts[0], shifts[-1] + 1)) and 0 in shifts and found[shifts.index(0)][1] == start
    for k, config in found:
        assert spec.parameter_count(config.to_dict()) == spec.parameter_count(5)
        assert bounds.contains(config)
        assert total_levels(config) == {'attn': 5 * n + k * a, 'mlp': 5 * n - k * m}
        assert max(config.attn) - min(config.attn) <= 1 and max(config.mlp) - min(config.mlp) <= 1
    room = lambda g, k, d: 0 <= total_levels(start)[g] + k * d <= n * bounds.upper.group(g)[0]
    assert not (room('attn', shifts[-1] + 1, a) and room('mlp', shifts[-1] + 1, -m))
    assert not (room('attn', shifts[0] - 1, a) and room('mlp', shifts[0] - 1, -m))
    # shift_group on an uneven group: the lowest units rise first, the highest fall first; None past the bounds
    assert shift_group([3, 1, 2, 1], 2, [0] * 4, [4] * 4) == [3, 2, 2, 2]
    assert sorted(shift_group([3, 1, 2, 1], -2, [0] * 4, [4] * 4)) == [1, 1, 1, 2]
    assert shift_group([3, 1, 2, 1], -1, [3, 0, 0, 0], [4] * 4) == [3, 1, 1, 1]  # unit 0 may not fall
    assert shift_group([3, 1], 5, [0, 0], [4, 4]) is None and shift_group([3, 1], -5, [0, 0], [4, 4]) is None


def test_unit_protection_candidates_move_one_unit_and_keep_the_size():
    """Against brute force on SmolLM2-135M's shapes: one candidate per unit that can fall, each lowering exactly
    that unit by half its kind's mean level (or to its lower bound) while the others only rise, by as many levels
    in all, units below the median (protected before) never rising; every candidate exactly the start's size and
    in bounds; a unit at its lower bound gets none."""
    import transformers

    from darwinlm_foundry.search.space import protect_unit, protection_step, unit_protection_candidates
    from darwinlm_foundry.structure.levels import LevelSpec
    spec = LevelSpec.from_config(transformers.LlamaConfig(
        vocab_size=1000, tie_word_embeddings=True, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3))
    n = spec.num_layers
    bounds = LevelBounds(uniform(n, 0), LevelConfig(attn=[spec.max_exact_level('attn')] * n,
                                                    mlp=[spec.max_exact_level('mlp')] * n))
    # attention dense but layer 3; MLP level 6-7 with layer 0 protected already (a start after one round)
    start = LevelConfig(attn=[0, 0, 0, 5] + [0] * (n - 4), mlp=[2] + [6 + i % 2 for i in range(1, n)])
    size = spec.parameter_count(start.to_dict())
    found = unit_protection_candidates(start, bounds)
    assert [(k, u) for k, u, _ in found] == [('attn', 3)] + [('mlp', u) for u in range(n)]
    for kind, unit, config in found:
        before, after = start.group(kind), config.group(kind)
        give = min(protection_step(before), before[unit])
        assert after[unit] == before[unit] - give
        rises = [after[i] - before[i] for i in range(n) if i != unit]
        assert min(rises) >= 0 and sum(rises) == give
        median = sorted(before)[n // 2]
        assert all(after[i] == before[i] for i in range(n) if i != unit and before[i] < median)
        other = 'mlp' if kind == 'attn' else 'attn'
        assert config.group(other) == start.group(other)
        assert spec.parameter_count(config.to_dict()) == size and bounds.contains(config)
    assert protection_step(start.mlp) == 4 and protection_step([0, 0, 1]) == 1
    assert protect_unit([0, 3], 0, 2, [0, 0], [4, 4]) is None  # at its lower bound
    assert protect_unit([4, 4], 0, 2, [0, 0], [4, 4]) is None  # the other cannot take the levels
    assert protect_unit([4, 1, 4, 4], 0, 2, [0] * 4, [9] * 4) == [2, 1, 5, 5]  # unit 1 (below the median) stays


# ==================================================================================================
# Selection
# ==================================================================================================
def test_schedule_defaults_and_validation():
    s = SelectionSchedule()
    assert (s.survivors, s.fitness_tokens, s.train_tokens, s.lr, s.offspring) == (
        (8, 4, 2, 1), (1024, 2048, 4096, 8192), (10_000, 50_000, 100_000, 200_000), 1e-5, 16)
    assert s.training_aware and SelectionSchedule.from_dict(s.to_dict()) == s
    assert not SelectionSchedule(train_tokens=[0, 0, 0, 0]).training_aware
    bad = [dict(survivors=[8, 4, 2]), dict(survivors=[8, 8, 2, 1]), dict(survivors=[8, 4, 2, 2]),
           dict(survivors=[32, 4, 2, 1]), dict(fitness_tokens=[0, 1, 2, 3]), dict(train_tokens=[-1, 0, 0, 0]),
           dict(lr=0.0), dict(offspring=0), dict(survivors=[]), dict(replace_margin=-0.1), dict(replace_margin=1.0)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            SelectionSchedule(**kwargs)
    with pytest.raises(ValueError, match=r"surviver: unknown key \(did you mean 'survivors'\?\)"):
        SelectionSchedule.from_dict({'surviver': [1]})


def table_evaluate(tables, calls):
    """evaluate() reading fitness from per-step tables keyed by candidate, recording every call."""
    def evaluate(candidates, k):
        calls.append((k, list(candidates)))
        return [tables[k][c] for c in candidates]
    return evaluate


@pytest.mark.parametrize('seed', range(20))
def test_selection_keeps_lowest_fitness_survivors(seed):
    py = random.Random(seed)
    margin = py.choice([0.0, 0.3])
    schedule = SelectionSchedule(survivors=[6, 3, 2, 1], fitness_tokens=[1, 1, 1, 1], train_tokens=[0, 0, 0, 0],
                                 offspring=10, replace_margin=margin)
    parent = 'P'
    offspring = [f'o{i}' for i in range(py.choice([10, 7, 4]))]
    # Few distinct values force ties.
    tables = [{c: float(py.randint(0, 4)) for c in [parent] + offspring} for _ in range(4)]
    calls = []
    result = run_generation(parent, offspring, schedule, table_evaluate(tables, calls))
    remaining = list(offspring)
    for k, (step_k, candidates) in enumerate(calls):
        assert step_k == k
        expected_candidates = [parent] + remaining if k == 3 else remaining
        assert sorted(candidates) == sorted(expected_candidates)
        kept = [parent if i == PARENT else offspring[i] for i in result.steps[k].kept]
        assert len(kept) == min(schedule.survivors[k], len(candidates))
        # Brute force: no dropped candidate is strictly better than a kept one (the last step: see below).
        dropped = [c for c in candidates if c not in kept]
        if dropped and k < 3:
            assert max(tables[k][c] for c in kept) <= min(tables[k][c] for c in dropped)
        remaining = [c for c in kept if c != parent]
    rivals = [c for c in calls[-1][1] if c != parent]
    best = min(tables[3][c] for c in rivals) if rivals else math.inf
    if best < tables[3][parent] * (1 - margin):  # an offspring replaces the parent only by more than the margin
        assert not result.parent_won and tables[3][result.winner] == best == result.fitness
        assert result.winner == [c for c in rivals if tables[3][c] == best][0]  # ties to the earlier candidate
    else:  # ties (and, with the margin, narrow wins) go to the parent
        assert result.winner == parent and result.parent_won and result.fitness == tables[3][parent]
    assert result.steps[3].kept == [PARENT if result.parent_won else offspring.index(result.winner)]
    assert parent not in sum((c for k, c in calls[:-1]), [])  # the parent joins the last step only


def test_best_probe_generation_is_the_lowest_probe_earliest_on_ties():
    history = [{'probe_fitness': f} for f in (1.2, 0.9, None, 0.9, 1.0)]
    assert best_probe_generation(1.1, history) == 2  # generation 2's parent; generation 4 ties it later
    assert best_probe_generation(0.8, history) == 0  # the start
    assert best_probe_generation(None, history[:1]) == 1
    assert best_probe_generation(None, [{}, {'probe_fitness': None}]) is None  # no probe: no pick
    assert best_probe_generation(0.5, []) == 0


def test_elitism():
    schedule = SelectionSchedule(survivors=[2, 1], fitness_tokens=[8, 8], train_tokens=[0, 5], offspring=3)
    offspring = ['a', 'b', 'c']
    # The parent is better than every offspring in the last step: it stays.
    tables = [{'a': 1.0, 'b': 2.0, 'c': 3.0}, {'P': 0.5, 'a': 1.0, 'b': 0.9}]
    result = run_generation('P', offspring, schedule, table_evaluate(tables, []))
    assert result.winner == 'P' and result.parent_won and result.fitness == 0.5
    # An offspring that beats the parent replaces it.
    tables[1]['P'] = 0.95
    result = run_generation('P', offspring, schedule, table_evaluate(tables, []))
    assert result.winner == 'b' and not result.parent_won and result.fitness == 0.9
    # A tie keeps the parent.
    tables[1]['P'] = 0.9
    assert run_generation('P', offspring, schedule, table_evaluate(tables, [])).winner == 'P'
    # 'c' was dropped in step 0 even though it would be best in step 1.
    tables[1].update(P=5.0, c=0.0)
    assert run_generation('P', offspring, schedule, table_evaluate(tables, [])).winner == 'b'
    # No offspring at all: the parent alone is evaluated and kept.
    calls = []
    result = run_generation('P', [], schedule, table_evaluate(tables, calls))
    assert result.winner == 'P' and calls == [(1, ['P'])]


def test_replace_margin_reaches_the_schedule_and_is_fingerprinted_only_when_set():
    from darwinlm_foundry.search.settings import SearchSettings
    assert 'replace_margin' not in SearchSettings().result_fields()  # states written before it existed resume
    settings = SearchSettings(replace_margin=0.002)
    assert settings.result_fields()['replace_margin'] == 0.002 and settings.schedule.replace_margin == 0.002
    with pytest.raises(ValueError, match=r'replace_margin must lie in \[0, 1\)'):
        SearchSettings(replace_margin=2)


def test_selection_rejects_bad_input_and_ranks_nan_last():
    schedule = SelectionSchedule(survivors=[1], fitness_tokens=[8], train_tokens=[0], offspring=2)
    with pytest.raises(RuntimeError, match='one per candidate'):
        run_generation('P', ['a'], schedule, lambda c, k: [1.0])
    with pytest.raises(ValueError, match='duplicates'):
        run_generation('P', ['a', 'a'], schedule, lambda c, k: [1.0] * len(c))
    with pytest.raises(ValueError, match='parent is among'):
        run_generation('P', ['P'], schedule, lambda c, k: [1.0] * len(c))
    assert rank([2.0, float('nan'), 1.0, 2.0]) == [2, 0, 3, 1]
    result = run_generation('P', ['a'], schedule, lambda c, k: [float('nan'), 3.0])
    assert result.winner == 'a'


# ==================================================================================================
# Fitness
# ==================================================================================================
def direct_kl(dense, student):
    """Per-token KL(softmax(dense) || softmax(student)) in float64, straight from the definition."""
    d, s = dense.double(), student.double()
    p = torch.exp(d) / torch.exp(d).sum(-1, keepdim=True)
    q = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


def test_kl_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(2, 7, 19, generator=g) * 3
    student = torch.randn(2, 7, 19, generator=g) * 3
    ref = direct_kl(dense, student)
    for chunk in (1, 3, 1000):
        torch.testing.assert_close(kl_divergence(dense, student, chunk_size=chunk), ref.mean().float(),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_divergence(dense, student, reduction='none'), ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_divergence(dense, student, reduction='sum'), ref.sum().float(), rtol=1e-5,
                               atol=1e-5)
    mask = torch.rand(2, 7, generator=g) > 0.4
    torch.testing.assert_close(kl_divergence(dense, student, mask=mask), ref[mask].mean().float(),
                               rtol=1e-5, atol=1e-6)
    assert float(kl_divergence(dense, dense)) == pytest.approx(0.0, abs=1e-6)
    # Half-precision inputs are upcast: same value as their fp32 copies.
    torch.testing.assert_close(kl_divergence(dense.bfloat16(), student.bfloat16()),
                               kl_divergence(dense.bfloat16().float(), student.bfloat16().float()))
    with pytest.raises(ValueError, match='no tokens'):
        kl_divergence(dense, student, mask=torch.zeros(2, 7, dtype=torch.bool))


def test_prepared_dense_targets_give_the_same_kl():
    from darwinlm_foundry.search.fitness import DenseTargets
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(3, 5, 23, generator=g) * 3
    dense[0, 1, 4] = float('-inf')  # a token the dense model never predicts: p = 0 must contribute 0
    student = torch.randn(3, 5, 23, generator=g) * 3
    mask = torch.rand(3, 5, generator=g) > 0.3
    d, q = dense.double().softmax(-1), student.double().log_softmax(-1)
    ref = torch.where(d > 0, d * (d.log() - q), torch.zeros_like(d)).sum(-1)
    targets = DenseTargets(logits=dense).prepare()
    for reduction, expected in (('none', ref.float()), ('sum', ref.sum().float()), ('mean', ref.mean().float())):
        torch.testing.assert_close(targets.kl(student, reduction=reduction), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets.kl(student, mask=mask), ref[mask].mean().float(), rtol=1e-5, atol=1e-6)
    # row slices keep the prepared form and agree with slicing the reference
    part = targets.rows(1, 3)
    assert part._prepared is not None
    torch.testing.assert_close(part.kl(student[1:3], reduction='sum'), ref[1:3].sum().float(), rtol=1e-5, atol=1e-5)
    assert set(targets.tensors()) == {'logits'}  # the prepared tensors are never written to the cache
    # released logits: half the memory, same KL, row slices still work
    released = DenseTargets(logits=dense.clone()).prepare(release_logits=True)
    assert released.logits is None and not released.is_topk and released.nbytes < targets.nbytes
    torch.testing.assert_close(released.kl(student, mask=mask), targets.kl(student, mask=mask))
    torch.testing.assert_close(released.rows(1, 3).kl(student[1:3], reduction='sum'),
                               part.kl(student[1:3], reduction='sum'))


def test_prepared_kl_of_a_model_with_itself_at_real_vocabulary_scale():
    """SmolLM2-sized rows (49,152 logits around 15-20, as a real LM head gives): KL(dense || dense) through the
    prepared form is ~0, not the ~1e-3 bias an unshifted fp32 dot product over raw logits had."""
    from darwinlm_foundry.search.fitness import DenseTargets
    g = torch.Generator().manual_seed(0)
    logits = 17 + 2 * torch.randn(64, 49152, generator=g)
    logits[:, :50] += 8  # a peaked distribution: most mass on a few tokens, as for real text
    kl = DenseTargets(logits=logits).prepare().kl(logits, reduction='none')
    assert kl.abs().max() < 2e-4, kl.abs().max()


def test_prepared_kl_stays_fp32_under_bf16_autocast():
    """A CPU search under amp_bf16 scores inside bf16 autocast, which would run the KL's einsum (a bmm) in bf16;
    the prepared KL, fused LM head or not, gives the fp32 values bit for bit there (the head's matmul aside)."""
    from darwinlm_foundry.search.fitness import DenseTargets
    g = torch.Generator().manual_seed(0)
    dense, student = 17 + 2 * torch.randn(2, 8, 4096, generator=g), 17 + 2 * torch.randn(2, 8, 4096, generator=g)
    t = DenseTargets(logits=dense).prepare()
    ref = t.kl(student, reduction='none')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(t.kl(student, reduction='none'), ref)
    # fused head: hidden states and head weight whose fp32 product is the student logits' row space
    hidden, head = torch.randn(2, 8, 64, generator=g), torch.randn(4096, 64, generator=g)
    fused = t.kl_hidden(hidden, head, reduction='none')
    assert torch.allclose(fused, t.kl(torch.nn.functional.linear(hidden, head), reduction='none'), atol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bf16 = t.kl_hidden(hidden, head, reduction='none')
    assert torch.equal(bf16, t.kl(torch.nn.functional.linear(hidden.bfloat16(), head.bfloat16()), reduction='none'))
    assert not torch.equal(bf16, fused)


def bucket_kl(dense, student, k):
    """Independent reference: KL between the (top-k + one 'rest' bucket) coarsenings, float64."""
    d, s = dense.double().log_softmax(-1), student.double().log_softmax(-1)
    out = []
    for dt, st in zip(d.reshape(-1, d.shape[-1]), s.reshape(-1, s.shape[-1])):
        top = torch.topk(dt, k).indices
        rest = torch.ones_like(dt, dtype=torch.bool)
        rest[top] = False
        p = torch.cat([dt[top].exp(), dt[rest].exp().sum().reshape(1)])
        q = torch.cat([st[top].exp(), st[rest].exp().sum().reshape(1)])
        out.append(sum(float(pi * (math.log(pi) - math.log(qi))) for pi, qi in zip(p, q) if pi > 0))
    return torch.tensor(out, dtype=torch.float64).reshape(dense.shape[:-1])


def test_topk_kl():
    g = torch.Generator().manual_seed(1)
    vocab = 50
    dense = torch.randn(3, 4, vocab, generator=g) * 2.5
    student = dense + torch.randn(3, 4, vocab, generator=g)
    exact = direct_kl(dense, student)
    lse = torch.logsumexp(dense, -1)
    previous = torch.zeros_like(exact)
    for k in (1, 2, 5, 10, 25, 49, 50):
        values, indices = dense.topk(k, dim=-1)
        approx = topk_kl(values, indices, student, lse, reduction='none').double()
        torch.testing.assert_close(approx, bucket_kl(dense, student, k), rtol=1e-4, atol=1e-5)
        assert (approx <= exact + 1e-5).all()        # a lower bound of the exact KL...
        assert (approx >= previous - 1e-5).all()     # ...that grows with k
        previous = approx
    torch.testing.assert_close(previous, exact, rtol=1e-5, atol=1e-5)  # k = vocab: exact
    # Values given as log-probabilities (no logsumexp) mean the same thing.
    values, indices = dense.log_softmax(-1).topk(10, dim=-1)
    torch.testing.assert_close(topk_kl(values, indices, student),
                               topk_kl(*dense.topk(10, dim=-1), student, lse), rtol=1e-5, atol=1e-6)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    full = topk_kl(*dense.topk(10, dim=-1), student, lse, reduction='none')
    torch.testing.assert_close(topk_kl(*dense.topk(10, dim=-1), student, lse, mask=mask, chunk_size=5),
                               full[mask].mean())


def test_token_nll_and_labels():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    labels = next_token_labels(ids)
    assert labels[:, -1].eq(-100).all() and torch.equal(labels[:, :-1], ids[:, 1:])
    logp = logits.double().log_softmax(-1)
    nll = [-float(logp[b, t, labels[b, t]]) for b in range(2) for t in range(5)]
    assert float(token_nll(logits, labels, chunk_size=4)) == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert float(token_nll(logits, labels, reduction='sum')) == pytest.approx(sum(nll), rel=1e-5)


def test_score_tokens_batches_add_up_to_the_whole():
    """The one token-scoring loop: batch by batch it gives the sums of one pass over all rows, counts the
    positions it scored, and with ``last=False`` scores exactly the positions that predict a token."""
    g = torch.Generator().manual_seed(3)
    table = torch.randn(13, 13, generator=g)  # a bigram "model": logits = table[token]
    dense_table = torch.randn(13, 13, generator=g)
    ids = torch.randint(0, 13, (5, 7), generator=g)
    logits, dense = table[ids], dense_table[ids]
    whole = DenseTargets(logits=dense)
    scores = score_tokens(lambda x: table[x], ids, 2, targets=whole.rows)
    labels = next_token_labels(ids)
    assert scores.nll == pytest.approx(float(token_nll(logits, labels, reduction='sum')), rel=1e-6)
    assert scores.kl == pytest.approx(float(kl_divergence(dense, logits, reduction='sum')), rel=1e-6)
    assert (scores.nll_tokens, scores.kl_tokens) == (5 * 6, 5 * 7)
    assert scores.sums('ppl') == (scores.nll, 30) and scores.sums('kl') == (scores.kl, 35)
    # held-out form: the last position (no next token) is left out of the KL too
    mask = labels != -100
    heldout = score_tokens(lambda x: table[x], ids, 3, last=False,
                           targets=lambda i, j: DenseTargets(logits=dense[i:j, :-1]))
    assert heldout.kl == pytest.approx(float(kl_divergence(dense, logits, mask=mask, reduction='sum')), rel=1e-6)
    assert heldout.nll == pytest.approx(scores.nll, rel=1e-6) and heldout.kl_tokens == 30
    means = heldout.means()
    assert means['nll'] == pytest.approx(scores.nll / 30) and means['ppl'] == pytest.approx(math.exp(means['nll']))
    # nll=False, no targets: nothing is scored
    assert score_tokens(lambda x: table[x], ids, 2, nll=False).sums('ppl') == (0.0, 0)


def test_fused_head_kl_equals_the_logits_kl():
    """The LM head fused into the prepared KL (chunks of tokens, as the search scores a CPU candidate) gives the
    values of the whole logits, bit for bit; NLL and unprepared targets fall back to the whole logits."""
    g = torch.Generator().manual_seed(4)
    n, length, hidden, vocab = 3, 300, 16, 97  # 900 tokens: several head chunks and KL chunks
    weight = torch.randn(vocab, hidden, generator=g)
    body = torch.randn(50, hidden, generator=g)  # a "model": hidden states = body[token]
    ids = torch.randint(0, 50, (n, length), generator=g)
    dense = DenseTargets(logits=torch.randn(n, length, vocab, generator=g) * 3).prepare(release_logits=True)
    logits = torch.nn.functional.linear(body[ids], weight)
    for reduction in ('sum', 'mean', 'none'):
        assert torch.equal(dense.kl_hidden(body[ids], weight, reduction=reduction), dense.kl(logits, reduction=reduction))
    plain = score_tokens(lambda x: torch.nn.functional.linear(body[x], weight), ids, 2, targets=dense.rows, nll=False)
    fused = score_tokens(lambda x: body[x], ids, 2, targets=dense.rows, nll=False, head_weight=weight)
    assert (fused.kl, fused.kl_tokens) == (plain.kl, plain.kl_tokens)
    with_nll = score_tokens(lambda x: body[x], ids, 2, targets=dense.rows, head_weight=weight)
    assert with_nll.sums('ppl') == score_tokens(lambda x: torch.nn.functional.linear(body[x], weight), ids, 2,
                                                targets=dense.rows).sums('ppl')


class CountingModel:
    """compute_fn stand-in: deterministic logits from the tokens, counting calls."""

    def __init__(self, vocab=32):
        self.calls = 0
        self.vocab = vocab
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(3))

    def __call__(self, tokens):
        self.calls += 1
        return self.table[tokens]


def test_dense_logit_cache_in_memory_computes_once():
    model = CountingModel()
    cache = DenseLogitCache()
    tokens = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    first = cache.get_or_compute(('fitness', 0, 0), tokens, model)
    second = cache.get_or_compute(('fitness', 0, 0), tokens.clone(), model)
    assert model.calls == 1 and cache.num_computed == 1 and second is first
    assert torch.equal(first.logits, model.table[tokens])
    cache.get_or_compute(('fitness', 0, 1), tokens, model)
    assert model.calls == 2 and len(cache) == 2
    with pytest.raises(ValueError, match='different tokens'):
        cache.get_or_compute(('fitness', 0, 0), tokens + 1, model)
    # The stored targets give the fitness directly.
    student = torch.randn(2, 5, 32)
    torch.testing.assert_close(first.kl(student), kl_divergence(model.table[tokens], student))


@pytest.mark.parametrize('topk,dtype', [(None, torch.float32), (None, torch.bfloat16), (6, torch.float16)])
def test_dense_logit_cache_on_disk(tmp_path, topk, dtype):
    model = CountingModel()
    tokens = torch.randint(0, 32, (3, 4), generator=torch.Generator().manual_seed(1))
    cache = DenseLogitCache(str(tmp_path), topk=topk, storage_dtype=dtype, memory_limit_bytes=0)
    a = cache.get_or_compute('sample-0', tokens, model)
    assert model.calls == 1 and cache.resident_bytes == 0  # over the memory limit: memory-mapped
    assert not [f for f in os.listdir(tmp_path) if '.tmp.' in f]
    # A new cache on the same directory (a resumed run) never recomputes.
    again = DenseLogitCache(str(tmp_path), topk=topk, storage_dtype=dtype)
    assert 'sample-0' in again and 'sample-1' not in again
    b = again.get_or_compute('sample-0', tokens, model)
    assert model.calls == 1 and again.num_computed == 0
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name])
    ref = model.table[tokens]
    if topk is None:
        assert b.logits.dtype == dtype and torch.equal(b.logits, ref.to(dtype))
    else:
        values, indices = ref.topk(topk, dim=-1)
        assert torch.equal(b.topk_indices, indices) and torch.equal(b.topk_values, values.half())
        torch.testing.assert_close(b.logsumexp, torch.logsumexp(ref, -1))
        student = torch.randn(3, 4, 32)
        torch.testing.assert_close(b.kl(student), topk_kl(values, indices, student, torch.logsumexp(ref, -1)),
                                   rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match='settings'):
        DenseLogitCache(str(tmp_path), topk=3 if topk is None else None).get_or_compute('sample-0', tokens, model)


def one_piece_prepare(logits):
    """The prepared dense side computed over the whole tensor at once (what DenseTargets.prepare used to do)."""
    log_p = logits.float().log_softmax(-1)
    p = log_p.exp()
    return p, torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1, dtype=torch.float64)


@pytest.mark.parametrize('shape,chunk', [((3, 5, 23), 1), ((2, 64, 512), 256), ((4, 37, 511), 7), ((2, 3, 50), 10_000)])
def test_prepare_logits_is_bit_identical_to_one_piece(shape, chunk):
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(*shape, generator=g) * 4
    logits[0, 1, 3] = float('-inf')
    p, ne = prepare_logits(logits, chunk_tokens=chunk)
    ref_p, ref_ne = one_piece_prepare(logits)
    assert p.dtype == torch.float32 and ne.dtype == torch.float64
    assert torch.equal(p, ref_p) and torch.equal(ne, ref_ne)
    # into slices of preallocated storage, block by block (how the cache fills a sample)
    out = (torch.empty_like(p), torch.empty_like(ne))
    for i in range(shape[0]):
        prepare_logits(logits[i:i + 1], out=(out[0][i:i + 1], out[1][i:i + 1]), chunk_tokens=chunk)
    assert torch.equal(out[0], ref_p) and torch.equal(out[1], ref_ne)
    assert torch.equal(DenseTargets(logits=logits).prepare()._prepared[0], ref_p)


def test_prepared_cache_computes_block_by_block_and_forgets():
    model = CountingModel()
    tokens = torch.randint(0, 32, (5, 4), generator=torch.Generator().manual_seed(4))
    blocks = []
    cache = DenseLogitCache(prepared=True, compute_rows=2)
    targets = cache.get_or_compute('s', tokens, lambda t: (blocks.append(len(t)), model(t))[1])
    assert blocks == [2, 2, 1] and cache.num_computed == 1
    assert targets.is_prepared and targets.logits is None and targets.tensors() == {}
    ref = DenseTargets(logits=model.table[tokens]).prepare()
    assert all(torch.equal(a, b) for a, b in zip(targets._prepared, ref._prepared))
    assert targets.nbytes == 5 * 4 * (32 * 4 + 8) == cache.resident_bytes  # no logits next to them
    student = torch.randn(5, 4, 32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(targets.rows(1, 4).kl(student[1:4], reduction='sum'),
                       ref.rows(1, 4).kl(student[1:4], reduction='sum'))
    cache.forget('s')
    assert 's' not in cache and cache.resident_bytes == 0
    cache.get_or_compute('s', tokens, model)
    assert cache.num_computed == 2


def test_prepared_cache_on_disk_and_older_logit_entries(tmp_path):
    model = CountingModel()
    tokens = torch.randint(0, 32, (3, 4), generator=torch.Generator().manual_seed(6))
    ref = DenseTargets(logits=model.table[tokens]).prepare()
    a = DenseLogitCache(str(tmp_path / 'p'), prepared=True, compute_rows=1).get_or_compute('k', tokens, model)
    b = DenseLogitCache(str(tmp_path / 'p'), prepared=True).get_or_compute('k', tokens, model)
    assert model.calls == 3 and all(torch.equal(x, y) for x, y in zip(b._prepared, ref._prepared))
    assert all(torch.equal(x, y) for x, y in zip(a._prepared, ref._prepared))
    with pytest.raises(ValueError, match='prepared targets'):
        DenseLogitCache(str(tmp_path / 'p')).get_or_compute('k', tokens, model)
    # a cache directory written with logits (before prepared caches existed) is read and prepared
    DenseLogitCache(str(tmp_path / 'l')).get_or_compute('k', tokens, model)
    c = DenseLogitCache(str(tmp_path / 'l'), prepared=True).get_or_compute('k', tokens, model)
    assert model.calls == 4 and c.logits is None
    assert all(torch.equal(x, y) for x, y in zip(c._prepared, ref._prepared))


@pytest.mark.parametrize('form', ['prepared', 'topk'])
def test_spilled_targets_read_back_rows(tmp_path, form):
    model = CountingModel()
    tokens = torch.randint(0, 32, (5, 4), generator=torch.Generator().manual_seed(7))
    cache = DenseLogitCache(prepared=True) if form == 'prepared' else DenseLogitCache(topk=5,
                                                                                     storage_dtype=torch.bfloat16)
    whole = cache.convert(model(tokens))
    spilled = SpilledTargets.write_blocks((cache.convert(model(tokens[i:i + 2])) for i in range(0, 5, 2)),
                                          str(tmp_path / 'probe'))
    assert len(spilled) == 5 and spilled.nbytes == 0
    student = torch.randn(5, 4, 32, generator=torch.Generator().manual_seed(8))
    for start, stop in ((0, 2), (1, 4), (3, 5), (4, 9)):
        part, ref = spilled.rows(start, stop), whole.rows(start, stop)
        assert part.stored_tensors().keys() == ref.stored_tensors().keys()
        assert all(torch.equal(part.stored_tensors()[k], v) for k, v in ref.stored_tensors().items())
        assert torch.equal(part.kl(student[start:stop], reduction='sum'), ref.kl(student[start:stop], reduction='sum'))


# ==================================================================================================
# Search state and the search loop
# ==================================================================================================
NUM_LAYERS = 6
SCHEDULE = SelectionSchedule(survivors=[4, 2, 1], fitness_tokens=[64, 128, 256], train_tokens=[0, 100, 200],
                             offspring=8)


def unit_weights():
    """Per-unit sensitivity of the synthetic fitness: some units are far cheaper to prune than others."""
    rng = np.random.default_rng(123)
    return {g: rng.uniform(0.1, 3.0, NUM_LAYERS) for g in GROUPS}


WEIGHTS = unit_weights()


def true_cost(cfg: LevelConfig) -> float:
    """Fixed per-unit-per-level cost table: convex in the level, scaled per unit."""
    return float(sum(WEIGHTS[g][i] * lvl ** 2 for g, i, lvl in cfg.items()))


def make_evaluate(generation):
    """Deterministic in (generation, step, candidate): noise that shrinks with the step's budget."""
    def evaluate(candidates, k):
        out = []
        for c in candidates:
            h = hashlib.sha256(f'{generation}|{k}|{c.to_json()}'.encode()).digest()
            noise = int.from_bytes(h[:8], 'little') / 2 ** 64 - 0.5
            out.append(true_cost(c) + noise * 4.0 / (k + 1))
        return out
    return evaluate


def new_state(kind='numpy'):
    return SearchState.new(uniform(NUM_LAYERS, 5), make_rng(11, kind), {'target_level': 5, 'seed': 11},
                           extra={'stage': 1})


def test_state_save_load_round_trip(tmp_path):
    path = str(tmp_path / 'state.json')
    state = new_state()
    run_search(state, 2, make_evaluate, LevelBounds.full(NUM_LAYERS), SCHEDULE, path)
    loaded = SearchState.load(path, {'target_level': 5, 'seed': 11})
    assert loaded.to_dict() == json.loads(json.dumps(state.to_dict()))
    assert loaded.generation == 2 and loaded.parent == state.parent and loaded.extra == {'stage': 1}
    assert loaded.rng().integers(1 << 62) == state.rng().integers(1 << 62)
    assert [h['generation'] for h in loaded.history] == [0, 1]
    assert not [f for f in os.listdir(tmp_path) if '.tmp.' in f]


def test_corrupt_or_mismatched_state_is_refused(tmp_path):
    path = str(tmp_path / 'state.json')
    new_state().save(path)
    with pytest.raises(SearchStateError, match='different settings') as err:
        SearchState.load(path, {'target_level': 6, 'seed': 11})
    assert path in str(err.value) and 'delete' in str(err.value)
    text = open(path).read()
    for broken in (text[: len(text) // 2], '[]', text.replace('"generation": 0', '"generation": -1'),
                   text.replace('darwinlm-search-state', 'other')):
        with open(path, 'w') as f:
            f.write(broken)
        with pytest.raises(SearchStateError, match='corrupt') as err:
            SearchState.load(path, None)
        assert path in str(err.value) and 'Delete it' in str(err.value)
    with pytest.raises(FileNotFoundError):
        SearchState.load(str(tmp_path / 'missing.json'), None)
    assert settings_fingerprint({'a': 1, 'b': 2}) == settings_fingerprint({'b': 2, 'a': 1})


class Killed(Exception):
    pass


@pytest.mark.parametrize('kind', ['numpy', 'python'])
def test_kill_and_resume_gives_the_same_result(tmp_path, kind):
    bounds = LevelBounds.full(NUM_LAYERS)
    n = 7
    reference = run_search(new_state(kind), n, make_evaluate, bounds, SCHEDULE, str(tmp_path / 'ref.json'))

    path = str(tmp_path / 'killed.json')

    def kill_after_3(state, result):
        if state.generation == 3:
            raise Killed

    with pytest.raises(Killed):
        run_search(new_state(kind), n, make_evaluate, bounds, SCHEDULE, path, on_generation=kill_after_3)
    resumed = SearchState.load(path, {'target_level': 5, 'seed': 11})
    assert resumed.generation == 3
    resumed = run_search(resumed, n, make_evaluate, bounds, SCHEDULE, path)

    def strip_time(d):
        d = json.loads(json.dumps(d))
        for h in d['history']:
            del h['seconds']
        return d

    assert strip_time(resumed.to_dict()) == strip_time(reference.to_dict())
    assert strip_time(SearchState.load(path, None).to_dict()) == strip_time(reference.to_dict())
    # A different seed takes a different path (the equality above is not vacuous).
    other = SearchState.new(uniform(NUM_LAYERS, 5), make_rng(12, kind), 'x')
    other = run_search(other, n, make_evaluate, bounds, SCHEDULE, None)
    assert [h['winner'] for h in other.history] != [h['winner'] for h in reference.history]


def test_synthetic_search_improves_on_uniform():
    bounds = LevelBounds.full(NUM_LAYERS)
    start = uniform(NUM_LAYERS, 5)
    state = run_search(SearchState.new(start, 0, 's'), 25, make_evaluate, bounds, SCHEDULE, None)
    assert_same_size(state.parent, start)
    assert true_cost(state.parent) < 0.9 * true_cost(start)
    # Units that are expensive to prune end up at lower levels than cheap ones (per group).
    for g in GROUPS:
        order = np.argsort(WEIGHTS[g])
        levels = np.array(state.parent.group(g))
        assert levels[order[:2]].mean() > levels[order[-2:]].mean()


def test_parent_probe_is_recorded_without_touching_the_search(tmp_path):
    """score_parent's value goes into every record as probe_fitness; the search itself (RNG, winners,
    fitness) is the same as without it, and a kill + resume reproduces the probed run."""
    bounds = LevelBounds.full(NUM_LAYERS)
    scored = []

    def probe(config):
        scored.append(config)
        return true_cost(config)

    plain = run_search(new_state(), 5, make_evaluate, bounds, SCHEDULE, None)
    probed = run_search(new_state(), 5, make_evaluate, bounds, SCHEDULE, None, score_parent=probe)
    assert [h['probe_fitness'] for h in probed.history] == [true_cost(LevelConfig.from_dict(h['winner']))
                                                           for h in probed.history]
    assert [LevelConfig.from_dict(h['winner']) for h in probed.history] == scored
    strip = [{k: v for k, v in h.items() if k not in ('seconds', 'probe_fitness')} for h in probed.history]
    assert strip == [{k: v for k, v in h.items() if k != 'seconds'} for h in plain.history]
    assert probed.rng_state == plain.rng_state and 'probe_fitness' not in plain.history[0]

    path = str(tmp_path / 'state.json')

    def kill_after_2(state, result):
        if state.generation == 2:
            raise Killed

    with pytest.raises(Killed):
        run_search(new_state(), 5, make_evaluate, bounds, SCHEDULE, path, on_generation=kill_after_2,
                   score_parent=probe)
    resumed = run_search(SearchState.load(path, None), 5, make_evaluate, bounds, SCHEDULE, path, score_parent=probe)
    assert [{k: v for k, v in h.items() if k != 'seconds'} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k != 'seconds'} for h in probed.history]
