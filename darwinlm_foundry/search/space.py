"""The search space of DarwinLM: one sparsity level per prunable unit, and level-switch mutation.

A configuration (:class:`LevelConfig`) holds one level (0 = dense .. 10 = removed) per unit, in two
groups: ``attn`` (one unit per layer: its query heads) and ``mlp`` (one unit per layer: its intermediate
columns). Every level step of a kind removes the same number of parameters, so the size of a model is
fixed by the per-group level sums (:func:`total_levels`). Mutation (:func:`mutate`) only ever moves one
level from one unit to another unit of the same group, which keeps both sums, hence the size, exact; so the
share of the cut that falls on each kind is fixed by the start. :func:`kind_balance_candidates` lists the starts
that move that share by whole exchanges of equal parameter cost (:func:`kind_exchange`), among which a search
with ``balance_kinds`` picks the fittest before its first generation.

Randomness always comes from an explicit generator passed in by the caller (``numpy.random.Generator``
or ``random.Random``), never from a global one, so a search can save and restore its RNG stream exactly
(:func:`rng_state` / :func:`rng_from_state`).

Pure Python + numpy: no torch, no Composer.
"""

from __future__ import annotations

import json
import math
import random
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np

from darwinlm_foundry.structure.levels import MAX_MLP_SPLIT  # finer MLP levels: up to MAX_LEVEL * it

__all__ = [
    'GROUPS',
    'MAX_LEVEL',
    'MAX_UNIT_LEVEL',
    'ATTN_TEMPLATE',
    'MLP_TEMPLATE',
    'LevelConfig',
    'LevelBounds',
    'uniform',
    'spread_extra_levels',
    'kind_exchange',
    'shift_group',
    'kind_balance_candidates',
    'protection_step',
    'protect_unit',
    'unit_protection_candidates',
    'total_levels',
    'assert_same_size',
    'admits_switch',
    'mutate',
    'make_offspring',
    'num_switches',
    'make_rng',
    'rng_state',
    'rng_from_state',
]

GROUPS = ('attn', 'mlp')
MAX_LEVEL = 10
MAX_UNIT_LEVEL = MAX_LEVEL * MAX_MLP_SPLIT  # the top MLP level
# Unit names of the research code's text format: the output matrix of each unit (the database is keyed by it).
ATTN_TEMPLATE = 'model.layers.{layer}.self_attn.o_proj'
MLP_TEMPLATE = 'model.layers.{layer}.mlp.down_proj'

Rng = Union[np.random.Generator, random.Random]


# --------------------------------------------------------------------------------------------------
# RNG helpers: the two supported generator types, drawn from and saved the same way.
# --------------------------------------------------------------------------------------------------
def make_rng(seed: int, kind: str = 'numpy') -> Rng:
    """A fresh seeded generator: ``kind='numpy'`` (PCG64 ``Generator``, default) or ``'python'``."""
    if kind == 'numpy':
        return np.random.default_rng(seed)
    if kind == 'python':
        return random.Random(seed)
    raise ValueError(f"rng kind must be 'numpy' or 'python', got {kind!r}")


def rng_state(rng: Rng) -> dict:
    """The exact state of ``rng`` as a JSON-serialisable dict (restore with :func:`rng_from_state`)."""
    if isinstance(rng, np.random.Generator):
        return {'kind': 'numpy', 'state': rng.bit_generator.state}
    if isinstance(rng, random.Random):
        version, internal, gauss_next = rng.getstate()
        return {'kind': 'python', 'state': [version, list(internal), gauss_next]}
    raise TypeError(f'unsupported rng type {type(rng).__name__}; use numpy.random.Generator or random.Random')


def rng_from_state(state: Mapping[str, Any]) -> Rng:
    """A generator positioned exactly at ``state`` (from :func:`rng_state`, possibly via JSON)."""
    kind = state.get('kind')
    if kind == 'numpy':
        inner = state['state']
        bit_generator = getattr(np.random, inner['bit_generator'])()
        bit_generator.state = inner
        return np.random.Generator(bit_generator)
    if kind == 'python':
        version, internal, gauss_next = state['state']
        rng = random.Random()
        rng.setstate((version, tuple(internal), gauss_next))
        return rng
    raise ValueError(f"unknown rng state kind {kind!r}; expected 'numpy' or 'python'")


def _randbelow(rng: Rng, n: int) -> int:
    """Uniform integer in [0, n) from either generator type."""
    if n <= 0:
        raise ValueError(f'cannot draw from an empty range (n={n})')
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    if isinstance(rng, random.Random):
        return rng.randrange(n)
    raise TypeError(f'unsupported rng type {type(rng).__name__}; use numpy.random.Generator or random.Random')


def _choice(rng: Rng, items: Sequence[Any]) -> Any:
    return items[_randbelow(rng, len(items))]


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------
def _as_levels(values: Any, group: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f'{group} levels must be a sequence of integers, got {values!r}') from err
    for i, (raw, level) in enumerate(zip(values, levels)):
        if level != raw:  # reject 5.5 silently becoming 5
            raise ValueError(f'{group} level of layer {i} must be an integer, got {raw!r}')
        top = MAX_UNIT_LEVEL if group == 'mlp' else MAX_LEVEL
        if not 0 <= level <= top:
            raise ValueError(f'{group} level of layer {i} is {level}; {group} levels must lie in 0..{top}')
    return levels


def _name_regex(template: str) -> re.Pattern:
    if template.count('{layer}') != 1:
        raise ValueError(f"unit name template must contain '{{layer}}' exactly once, got {template!r}")
    head, tail = template.split('{layer}')
    return re.compile(re.escape(head) + r'(\d+)' + re.escape(tail))


@dataclass(frozen=True)
class LevelConfig:
    """One sparsity level per unit: ``attn[i]`` / ``mlp[i]`` is the level of layer ``i``'s attention / MLP.

    Immutable and hashable (levels are stored as tuples), so duplicate candidates can be detected with a
    set. Both groups have one entry per layer. Levels are integers in ``0..MAX_LEVEL``.
    """

    attn: tuple[int, ...]
    mlp: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, 'attn', _as_levels(self.attn, 'attn'))
        object.__setattr__(self, 'mlp', _as_levels(self.mlp, 'mlp'))
        if len(self.attn) != len(self.mlp):
            raise ValueError(
                f'attn has {len(self.attn)} levels but mlp has {len(self.mlp)}; give one level per layer in both')
        if not self.attn:
            raise ValueError('a LevelConfig needs at least one layer')

    # -- access ------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.attn)

    def group(self, name: str) -> tuple[int, ...]:
        """The levels of group ``'attn'`` or ``'mlp'``."""
        if name not in GROUPS:
            raise ValueError(f'unknown group {name!r}; groups are {GROUPS}')
        return getattr(self, name)

    def items(self) -> Iterator[tuple[str, int, int]]:
        """``(group, layer, level)`` for every unit, attention group first."""
        for g in GROUPS:
            for layer, level in enumerate(self.group(g)):
                yield g, layer, level

    def replace(self, **groups: Sequence[int]) -> 'LevelConfig':
        """A copy with the given groups replaced, e.g. ``cfg.replace(mlp=[...])``."""
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ValueError(f'unknown group(s) {sorted(unknown)}; groups are {GROUPS}')
        return LevelConfig(**{g: groups.get(g, self.group(g)) for g in GROUPS})

    # -- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, list[int]]:
        return {g: list(self.group(g)) for g in GROUPS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[int]]) -> 'LevelConfig':
        """From ``{'attn': [...], 'mlp': [...]}``; unknown or missing keys are errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a level configuration must be a mapping {{'attn': [...], 'mlp': [...]}}, got {data!r}")
        unknown = sorted(set(data) - set(GROUPS))
        missing = [g for g in GROUPS if g not in data]
        if unknown or missing:
            raise ValueError(f'level configuration keys must be exactly {list(GROUPS)}; '
                             f'unknown: {unknown}, missing: {missing}')
        return cls(attn=data['attn'], mlp=data['mlp'])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> 'LevelConfig':
        return cls.from_dict(json.loads(text))

    # -- research-code text format -------------------------------------------------------------------
    def to_text(self, attn_template: str = ATTN_TEMPLATE, mlp_template: str = MLP_TEMPLATE) -> str:
        """The research code's ``name: level`` format, one unit per line.

        Names are the units' output matrices (``model.layers.3.mlp.down_proj: 5``); the MLP group comes
        first, then attention (the order the research scripts write, i.e. the groups of their sorted layer
        names). No trailing newline: their reader splits every line on ``':'``, including an empty last one.
        """
        mlp = [f'{mlp_template.format(layer=i)}: {lvl}' for i, lvl in enumerate(self.mlp)]
        attn = [f'{attn_template.format(layer=i)}: {lvl}' for i, lvl in enumerate(self.attn)]
        return '\n'.join(mlp + attn)

    @classmethod
    def from_text(cls, text: str, attn_template: str = ATTN_TEMPLATE,
                  mlp_template: str = MLP_TEMPLATE) -> 'LevelConfig':
        """Parse the ``name: level`` format (any line order; blank lines and ``#`` comments skipped)."""
        patterns = {'attn': _name_regex(attn_template), 'mlp': _name_regex(mlp_template)}
        found: dict[str, dict[int, int]] = {g: {} for g in GROUPS}
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith('#'):
                continue
            name, sep, level_text = line.rpartition(':')
            if not sep:
                raise ValueError(f"line {lineno}: expected 'name: level', got {raw!r}")
            name = name.strip()
            try:
                level = int(level_text.strip())
            except ValueError as err:
                raise ValueError(f'line {lineno}: level must be an integer, got {level_text.strip()!r}') from err
            for g, pattern in patterns.items():
                match = pattern.fullmatch(name)
                if match:
                    layer = int(match.group(1))
                    if layer in found[g]:
                        raise ValueError(f'line {lineno}: {name} is listed twice')
                    found[g][layer] = level
                    break
            else:
                raise ValueError(f'line {lineno}: unit name {name!r} matches neither {attn_template!r} '
                                 f'nor {mlp_template!r}; pass the templates your model uses')
        groups = {}
        for g in GROUPS:
            layers = sorted(found[g])
            if layers != list(range(len(layers))):
                missing = sorted(set(range(max(layers, default=-1) + 1)) - set(layers))
                raise ValueError(f'{g} units are missing for layers {missing}; every layer needs a level')
            groups[g] = [found[g][i] for i in layers]
        return cls(**groups)

    @classmethod
    def read_file(cls, path: str) -> 'LevelConfig':
        """The one level-file reader: a ``winner.json`` (key ``levels``), a ``{'attn','mlp'}`` JSON, or
        ``layer: level`` text (``winner.txt``)."""
        with open(path, encoding='utf-8') as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return cls.from_text(text)
        return cls.from_dict(data.get('levels', data) if isinstance(data, dict) else data)


def uniform(num_layers: int, level: int, mlp_split: int = 1) -> LevelConfig:
    """Every unit at ``level`` (the search's usual start); with finer MLP levels (``mlp_split``, see
    ``LevelSpec.mlp_split``) the MLP units at ``level * mlp_split``, the same fraction."""
    if num_layers < 1:
        raise ValueError(f'num_layers must be >= 1, got {num_layers}')
    return LevelConfig(attn=[level] * num_layers, mlp=[level * int(mlp_split)] * num_layers)


def total_levels(config: LevelConfig) -> dict[str, int]:
    """Per-group level sums: the size invariant (equal sums <=> equal parameter count, per group)."""
    return {g: sum(config.group(g)) for g in GROUPS}


def assert_same_size(a: LevelConfig, b: LevelConfig) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same layers and the same per-group level sums."""
    if a.num_layers != b.num_layers:
        raise ValueError(f'configurations have {a.num_layers} and {b.num_layers} layers')
    sa, sb = total_levels(a), total_levels(b)
    if sa != sb:
        raise ValueError(f'configurations differ in size: level sums {sa} vs {sb}; a level switch must move '
                         f'a level between two units of the same group')


# --------------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LevelBounds:
    """Per-unit allowed levels: ``lower`` <= level <= ``upper`` unit by unit (both are LevelConfigs).

    ``full`` allows 0..MAX_LEVEL everywhere; ``starting_at`` is the gradual mode's bound (the database of
    the second stage starts every unit at its current level, so a unit cannot go below it). Narrower
    ``upper`` bounds express units whose database lacks the higher levels.
    """

    lower: LevelConfig
    upper: LevelConfig

    def __post_init__(self):
        if self.lower.num_layers != self.upper.num_layers:
            raise ValueError(f'lower bound has {self.lower.num_layers} layers, upper {self.upper.num_layers}')
        for g, layer, lo in self.lower.items():
            hi = self.upper.group(g)[layer]
            if lo > hi:
                raise ValueError(f'{g} layer {layer}: lower bound {lo} exceeds upper bound {hi}')

    @property
    def num_layers(self) -> int:
        return self.lower.num_layers

    @classmethod
    def full(cls, num_layers: int, min_level: int = 0, max_level: int = MAX_LEVEL) -> 'LevelBounds':
        """The same [min_level, max_level] for every unit."""
        return cls(uniform(num_layers, min_level), uniform(num_layers, max_level))

    @classmethod
    def starting_at(cls, config: LevelConfig, max_level: int = MAX_LEVEL) -> 'LevelBounds':
        """Gradual mode: each unit may not go below its level in ``config``."""
        return cls(config, uniform(config.num_layers, max_level))

    def to_dict(self) -> dict:
        return {'lower': self.lower.to_dict(), 'upper': self.upper.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'LevelBounds':
        unknown = sorted(set(data) - {'lower', 'upper'})
        if unknown:
            raise ValueError(f"unknown LevelBounds keys {unknown}; expected 'lower' and 'upper'")
        return cls(LevelConfig.from_dict(data['lower']), LevelConfig.from_dict(data['upper']))

    def violations(self, config: LevelConfig) -> list[str]:
        """Human-readable list of the units of ``config`` outside the bounds (empty when inside)."""
        if config.num_layers != self.num_layers:
            return [f'configuration has {config.num_layers} layers, bounds have {self.num_layers}']
        out = []
        for g, layer, level in config.items():
            lo, hi = self.lower.group(g)[layer], self.upper.group(g)[layer]
            if not lo <= level <= hi:
                out.append(f'{g} layer {layer}: level {level} outside [{lo}, {hi}]')
        return out

    def contains(self, config: LevelConfig) -> bool:
        return not self.violations(config)

    def check(self, config: LevelConfig) -> None:
        """Raise ``ValueError`` naming every unit of ``config`` outside the bounds."""
        bad = self.violations(config)
        if bad:
            raise ValueError('configuration outside the level bounds: ' + '; '.join(bad))


# --------------------------------------------------------------------------------------------------
# Gradual mode start
# --------------------------------------------------------------------------------------------------
def spread_extra_levels(config: LevelConfig, extra_levels_per_group: Union[float, Mapping[str, float]],
                        bounds: LevelBounds, rng: Rng) -> LevelConfig:
    """Raise the average level of each group by ``extra`` (gradual mode: e.g. level 5 -> 6).

    ``extra * num_layers`` single-level increments are spread over the units of the group, each to a unit
    drawn uniformly among those still below their upper bound. ``extra_levels_per_group`` is one number for
    both groups or ``{'attn': e_a, 'mlp': e_m}``; ``extra * num_layers`` must be a whole number.
    """
    bounds.check(config)
    if isinstance(extra_levels_per_group, Mapping):
        unknown = sorted(set(extra_levels_per_group) - set(GROUPS))
        if unknown:
            raise ValueError(f'unknown group(s) {unknown} in extra_levels_per_group; groups are {GROUPS}')
        extras = {g: extra_levels_per_group.get(g, 0) for g in GROUPS}
    else:
        extras = {g: extra_levels_per_group for g in GROUPS}
    new = {}
    for g in GROUPS:
        increments = extras[g] * config.num_layers
        if increments < 0 or abs(increments - round(increments)) > 1e-9:
            raise ValueError(f'{g}: extra={extras[g]} levels per unit over {config.num_layers} units gives '
                             f'{increments} increments; it must be a non-negative whole number')
        levels = list(config.group(g))
        upper = bounds.upper.group(g)
        for _ in range(int(round(increments))):
            room = [i for i, lvl in enumerate(levels) if lvl < upper[i]]
            if not room:
                raise ValueError(f'{g}: cannot add {int(round(increments))} levels, every unit is at its upper bound')
            levels[_choice(rng, room)] += 1
        new[g] = levels
    return LevelConfig(**new)


# --------------------------------------------------------------------------------------------------
# Balance between the kinds (the start of a search with ``balance_kinds``)
# --------------------------------------------------------------------------------------------------
def kind_exchange(attn_step_parameters: int, mlp_step_parameters: int) -> tuple[int, int]:
    """The smallest ``(a, m)`` with ``a`` attention level steps costing exactly what ``m`` MLP level steps cost.

    Mutation keeps each kind's level sum, so how much of the cut falls on attention is fixed by the start; an
    exchange of ``a`` attention levels for ``m`` MLP levels is the smallest move between kinds that keeps the
    parameter count exact (SmolLM2-135M: 15 heads for 4 steps of 160 MLP columns).
    """
    if attn_step_parameters < 1 or mlp_step_parameters < 1:
        raise ValueError(f'level steps must cost at least one parameter, got {attn_step_parameters} (attention) and '
                         f'{mlp_step_parameters} (MLP)')
    g = math.gcd(int(attn_step_parameters), int(mlp_step_parameters))
    return int(mlp_step_parameters) // g, int(attn_step_parameters) // g


def _spread_order(n: int) -> list[int]:
    """A fixed order of ``n`` units that spreads consecutive picks over the depth (golden-ratio sequence)."""
    golden = (math.sqrt(5) - 1) / 2
    return sorted(range(n), key=lambda i: ((i + 1) * golden) % 1.0)


def shift_group(levels: Sequence[int], delta: int, lower: Sequence[int], upper: Sequence[int]) -> list[int] | None:
    """``levels`` with ``delta`` levels added (``delta`` > 0: one at a time to the lowest unit below its upper
    bound) or removed (< 0: from the highest unit above its lower bound), ties taken in :func:`_spread_order`,
    so an even start stays as even as the count allows. None when the bounds cannot take ``delta``."""
    out = list(levels)
    rank = {unit: r for r, unit in enumerate(_spread_order(len(out)))}
    for _ in range(abs(int(delta))):
        if delta > 0:
            room = [i for i, lvl in enumerate(out) if lvl < upper[i]]
            if not room:
                return None
            out[min(room, key=lambda i: (out[i], rank[i]))] += 1
        else:
            room = [i for i, lvl in enumerate(out) if lvl > lower[i]]
            if not room:
                return None
            out[min(room, key=lambda i: (-out[i], rank[i]))] -= 1
    return out


def kind_balance_candidates(config: LevelConfig, bounds: LevelBounds,
                            exchange: tuple[int, int]) -> list[tuple[int, LevelConfig]]:
    """Every configuration ``k`` exchanges away from ``config`` within ``bounds``, as ``(k, config)`` by ``k``.

    Shift ``k`` adds ``k * a`` attention levels and removes ``k * m`` MLP levels (``exchange = (a, m)``, see
    :func:`kind_exchange`; ``k < 0`` the other way), so every candidate has the parameter count of ``config``
    as long as the bounds stay within the exactly size-neutral levels. ``k = 0`` is ``config`` itself.
    """
    bounds.check(config)
    a, m = exchange
    out = [(0, config)]
    for sign in (1, -1):
        k = sign
        while True:
            attn = shift_group(config.attn, k * a, bounds.lower.attn, bounds.upper.attn)
            mlp = shift_group(config.mlp, -k * m, bounds.lower.mlp, bounds.upper.mlp)
            if attn is None or mlp is None:
                break
            out.append((k, LevelConfig(attn=attn, mlp=mlp)))
            k += sign
    return sorted(out, key=lambda item: item[0])


def protection_step(levels: Sequence[int]) -> int:
    """Levels a unit gives back when protected (:func:`protect_unit`): half its group's mean level, rounded up
    (at least 1): a move large enough that a sensitive unit stands out of one sample's noise (SmolLM2-135M's
    first MLP: 0.69x -> 0.58x the uniform model's held-out perplexity), while the others take under a level each."""
    return max(1, math.ceil(sum(levels) / max(1, len(levels)) / 2))


def protect_unit(levels: Sequence[int], unit: int, delta: int, lower: Sequence[int],
                 upper: Sequence[int]) -> list[int] | None:
    """``levels`` with ``unit`` lowered by ``delta`` levels (not below its lower bound) and the levels it gives
    back added to the other units (:func:`shift_group`, lowest first, ties spread over the depth), so the level
    sum -- the size -- is unchanged. Units below the group's median level (protected before) take none of them.
    None when the unit cannot go lower or the others cannot take them."""
    give = min(int(delta), levels[unit] - lower[unit])
    if give < 1:
        return None
    median = sorted(levels)[len(levels) // 2]
    others = [i for i in range(len(levels)) if i != unit]
    spread = shift_group([levels[i] for i in others], give, [lower[i] for i in others],
                         [upper[i] if levels[i] >= median else levels[i] for i in others])
    if spread is None:
        return None
    out = list(levels)
    out[unit] -= give
    for i, lvl in zip(others, spread):
        out[i] = lvl
    return out


def unit_protection_candidates(config: LevelConfig, bounds: LevelBounds) -> list[tuple[str, int, LevelConfig]]:
    """Every ``(kind, unit, config)`` that protects one unit of ``config`` (:func:`protect_unit` by
    :func:`protection_step` of its kind), each exactly the size of ``config`` within size-neutral bounds.

    Mutation moves one level at a time between two random units, too small a step to see on a fitness sample
    when one unit (a first layer's MLP, say) is far more sensitive than the rest: protecting it by several
    levels at once is a move of a size the search's start can measure.
    """
    bounds.check(config)
    out = []
    for kind in GROUPS:
        levels = config.group(kind)
        step = protection_step(levels)
        for unit in range(len(levels)):
            moved = protect_unit(levels, unit, step, bounds.lower.group(kind), bounds.upper.group(kind))
            if moved is not None:
                out.append((kind, unit, config.replace(**{kind: moved})))
    return out


# --------------------------------------------------------------------------------------------------
# Mutation
# --------------------------------------------------------------------------------------------------
def _movable(levels: Sequence[int], lower: Sequence[int], upper: Sequence[int]) -> tuple[list[int], list[int]]:
    ups = [i for i, lvl in enumerate(levels) if lvl < upper[i]]
    downs = [i for i, lvl in enumerate(levels) if lvl > lower[i]]
    return ups, downs


def _group_admits_switch(ups: Sequence[int], downs: Sequence[int]) -> bool:
    # Need some i in ups and a different j in downs.
    return bool(ups) and bool(downs) and not (len(ups) == 1 and len(downs) == 1 and ups[0] == downs[0])


def admits_switch(config: LevelConfig, bounds: LevelBounds) -> bool:
    """Whether at least one group of ``config`` admits a level switch within ``bounds``."""
    return any(
        _group_admits_switch(*_movable(config.group(g), bounds.lower.group(g), bounds.upper.group(g)))
        for g in GROUPS)


DEFAULT_MAX_SWITCHES = 3


def num_switches(rng: Rng, max_switches: int = DEFAULT_MAX_SWITCHES) -> int:
    """min(U{1,m}, U{1,m}) for ``m = max_switches``: small steps most often (m = 3: 1, 2, 3 switches with
    probabilities 5/9, 3/9, 1/9)."""
    if max_switches < 1:
        raise ValueError(f'max_switches must be >= 1, got {max_switches}')
    return min(1 + _randbelow(rng, max_switches), 1 + _randbelow(rng, max_switches))


def mutate(parent: LevelConfig, bounds: LevelBounds, rng: Rng, n_switches: int | None = None,
           max_switches: int = DEFAULT_MAX_SWITCHES) -> LevelConfig:
    """One offspring of ``parent``: ``n_switches`` (default min(U{1,m}, U{1,m}), m = ``max_switches``) level
    switches.

    Each switch picks a group uniformly among those that admit one, then a unit that can go up one level
    and a different unit of the same group that can go down one level (uniformly among the valid ones),
    and applies both. Per-group level sums, hence the size, are unchanged; every unit stays in ``bounds``.
    Successive switches may cancel, so the result can equal the parent (:func:`make_offspring` filters).
    """
    bounds.check(parent)
    if n_switches is None:
        n_switches = num_switches(rng, max_switches)
    levels = {g: list(parent.group(g)) for g in GROUPS}
    for _ in range(n_switches):
        moves = {g: _movable(levels[g], bounds.lower.group(g), bounds.upper.group(g)) for g in GROUPS}
        open_groups = [g for g in GROUPS if _group_admits_switch(*moves[g])]
        if not open_groups:
            raise ValueError('no level switch is possible: in every group, no unit can go up while a different '
                             'one goes down within the bounds; widen the bounds or change the target level')
        g = _choice(rng, open_groups)
        ups, downs = moves[g]
        # Only units with a valid partner, so the draw never dead-ends.
        ups = [i for i in ups if any(j != i for j in downs)]
        up = _choice(rng, ups)
        down = _choice(rng, [j for j in downs if j != up])
        levels[g][up] += 1
        levels[g][down] -= 1
    return LevelConfig(**levels)


def make_offspring(parent: LevelConfig, n: int, bounds: LevelBounds, rng: Rng,
                   max_tries: int | None = None, max_switches: int = DEFAULT_MAX_SWITCHES) -> list[LevelConfig]:
    """``n`` distinct mutants of ``parent`` (:func:`mutate` with ``max_switches``), none equal to it, each with
    exactly its size.

    Gives up after ``max_tries`` mutations (default ``50 * n + 100``); when the space is too small it
    returns fewer than ``n`` (possibly none) and emits a ``RuntimeWarning`` saying how many.
    """
    if n < 0:
        raise ValueError(f'number of offspring must be >= 0, got {n}')
    bounds.check(parent)
    if max_tries is None:
        max_tries = 50 * n + 100
    if not admits_switch(parent, bounds):
        if n:
            warnings.warn('no level switch is possible from this parent within the bounds; no offspring made',
                          RuntimeWarning, stacklevel=2)
        return []
    seen = {parent}
    out: list[LevelConfig] = []
    tries = 0
    while len(out) < n and tries < max_tries:
        tries += 1
        child = mutate(parent, bounds, rng, max_switches=max_switches)
        if child in seen:
            continue
        assert_same_size(child, parent)  # invariant of mutate; cheap to keep honest
        seen.add(child)
        out.append(child)
    if len(out) < n:
        warnings.warn(f'made only {len(out)} of {n} distinct offspring in {max_tries} tries: the search space '
                      f'around this parent is too small', RuntimeWarning, stacklevel=2)
    return out
