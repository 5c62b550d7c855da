"""Sparsity levels computed from a model config: how many heads / MLP columns each level keeps.

The rule (one per kind, the same for every unit of that kind)
-------------------------------------------------------------
A kind has ``n`` structures in the dense model (query heads for ``attn``, intermediate columns for ``mlp``)
and a quantum ``q`` (1 head; ``mlp_multiple`` columns, 32 by default). Its step is the largest multiple of
``q`` that fits ``num_levels`` times into ``n``::

    step = floor(n / (num_levels * q)) * q          keep(l) = n - l * step     for l = 0 .. num_levels

so the count is *affine in the level everywhere*: level 0 is dense and every level switch of a kind adds or
removes exactly ``step`` structures. The remainder ``r = n - num_levels * step`` (``0 <= r < num_levels*q``)
stays at the top level instead of being squeezed into one uneven step (which is what typing columns by hand
in the research code did): with ``r > 0`` the top level keeps ``r`` structures (e.g. 2 of 32 heads, 128 of
11008 MLP columns), with ``r == 0`` it keeps none and the unit is removed.

Why this rule: every other choice breaks an equal step somewhere (``level 10 = removed`` plus ``level 0 =
dense`` forces ``n = 10 * step``). Parameter cost is affine in the kept count as long as the unit exists, so
with this rule a switch that moves one unit up a level and another unit of the same kind down a level keeps
the parameter count exactly, *except* when a unit enters or leaves full removal (only possible when
``r == 0``): removal also drops the tensors a unit pays for once (its RMSNorm, and under grouped-query
attention its whole K/V projections, plus output biases). :meth:`LevelSpec.removal_overhead` gives that
amount and :meth:`LevelSpec.max_exact_level` the highest level up to which every switch is exactly
size-neutral (``num_levels`` when ``r > 0`` or the overhead is 0, else ``num_levels - 1``). A search that
must keep the size exact bounds each unit's level by it; one that allows removal accepts that switching a
unit into removal also frees its overhead.

How many levels: ``num_levels`` is 10 (the paper's 0..10) wherever every kind has at least 10 quanta. A model
with fewer query heads (SmolLM2-135M: 9, Qwen2.5-0.5B: 14 is fine, a 2-head toy: 2) gets
``num_levels = min(10, heads, mlp_columns // mlp_multiple)`` automatically (:func:`auto_num_levels`): one
head per step, and level ``l`` still removes ``l / num_levels`` of every kind, so the *fraction* pruned per
level is as in the paper with coarser steps (SmolLM2: 9 levels; level 5 keeps 4 of 9 heads and 736 of 1536
MLP columns, about half of the attention+MLP parameters under GQA, since K/V stay whole). The number of
levels is recorded next to the steps (``DarwinLMConfig.num_levels``, the database manifest), so a pruned
model re-opens with the same levels for gradual pruning.

Finer MLP levels (``mlp_split``, the database's ``calibration.mlp_level_split``): a few-head model's MLP step is
coarse (SmolLM2: 160 of 1536 columns, because attention allows 9 levels), so the MLP may get ``mlp_split`` levels
per level instead: steps of ``step / mlp_split`` columns and MLP levels ``0 .. num_levels * mlp_split``. Nominal
level ``l`` is attention level ``l`` and MLP level ``l * mlp_split`` (:meth:`LevelSpec.kind_level`; an int given
for a whole model is nominal), so the uniform model and the target size stay those of ``mlp_split = 1``; a
switch moves one fine MLP level and stays size-neutral. The split is recorded in the pruned config
(``mlp_level_split``) and the manifest, and gradual pruning keeps it.

Gradual mode: a model that is already pruned (DarwinLM config) keeps the steps of the *original* dense
model (``config.level_steps``, written there when the model was made, or recomputed from the dense sizes
the DarwinLM config keeps in ``num_attention_heads`` / ``intermediate_size``); each unit's current count
must then sit exactly on a level, which :attr:`LevelSpec.current_levels` reports.

Pure: needs only a config-like object (no torch, no Composer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Union

__all__ = ['KINDS', 'LevelSpec', 'parameter_count', 'normalise_levels', 'auto_num_levels']

KINDS = ('attn', 'mlp')
DEFAULT_NUM_LEVELS = 10
DEFAULT_MLP_MULTIPLE = 32
MAX_MLP_SPLIT = 4  # finer MLP levels: at most this many per level (the search space's level bound follows)


def _head_dim(config) -> int:
    return getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads


def _current_counts(config) -> dict[str, list[int]]:
    """Current heads / columns per layer of a dense or DarwinLM config."""
    n_layers = config.num_hidden_layers
    if getattr(config, 'model_type', None) == 'darwinlm':
        return {'attn': [len(h) for h in config.layer_heads],
                'mlp': [int(s) for s in config.layer_intermediate_sizes]}
    return {'attn': [config.num_attention_heads] * n_layers, 'mlp': [config.intermediate_size] * n_layers}


def _biases(config) -> tuple[bool, bool, bool]:
    """(qkv_bias, o_bias, mlp_bias) of a dense Llama/Mistral/Qwen2 or DarwinLM config."""
    model_type = getattr(config, 'model_type', None)
    if model_type == 'darwinlm':
        return bool(config.qkv_bias), bool(config.o_bias), bool(config.mlp_bias)
    if model_type == 'qwen2':
        return True, False, False
    if model_type == 'mistral':
        return False, False, False
    bias = bool(getattr(config, 'attention_bias', False))
    return bias, bias, bool(getattr(config, 'mlp_bias', False))


def _step(n: int, num_levels: int, quantum: int) -> int:
    return (n // (num_levels * quantum)) * quantum


def auto_num_levels(heads: int, mlp_columns: int, mlp_multiple: int = DEFAULT_MLP_MULTIPLE) -> int:
    """The paper's 10 levels, or fewer when a kind has fewer than 10 quanta (one level step per head)."""
    return max(1, min(DEFAULT_NUM_LEVELS, int(heads), int(mlp_columns) // int(mlp_multiple)))


@dataclass(frozen=True)
class LevelSpec:
    """Level -> structure count per kind, plus what is needed for exact parameter counts.

    Build with :meth:`from_config`; ``dense`` / ``step`` hold the original dense count and the step of each
    kind, ``current_levels`` each unit's level now (all 0 for a dense model).
    """

    num_levels: int
    dense: Mapping[str, int]            # {'attn': heads, 'mlp': columns} of the original dense model
    step: Mapping[str, int]             # structures removed per level
    quantum: Mapping[str, int]          # steps are multiples of this (1 head; mlp_multiple columns)
    current_levels: Mapping[str, tuple]  # per kind, one level per layer
    head_dim: int
    hidden_size: int
    vocab_size: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    family: str = 'llama'
    mlp_split: int = 1                  # MLP levels per nominal level (finer MLP steps; attention: 1)

    def __post_init__(self):
        if not 1 <= int(self.mlp_split) <= MAX_MLP_SPLIT:
            raise ValueError(f'mlp_split must lie in 1..{MAX_MLP_SPLIT}, got {self.mlp_split}')
        for kind in KINDS:
            n, s, q, top = self.dense[kind], self.step[kind], self.quantum[kind], self.top(kind)
            if s <= 0 or s % q or top * s > n:
                raise ValueError(
                    f'{kind}: step {s} is invalid for {n} structures and {top} levels (it must be a '
                    f'positive multiple of {q} with {top} * step <= {n}).')
            levels = tuple(int(v) for v in self.current_levels[kind])
            if len(levels) != self.num_layers:
                raise ValueError(f'current_levels[{kind!r}] has {len(levels)} entries for {self.num_layers} layers')
            object.__setattr__(self, 'current_levels', {**self.current_levels, kind: levels})
        if self.dense['attn'] % self.num_key_value_heads:
            raise ValueError(f'{self.dense["attn"]} query heads is not a multiple of '
                             f'{self.num_key_value_heads} K/V heads')

    # ----------------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, *, num_levels: Optional[int] = None,
                    mlp_multiple: int = DEFAULT_MLP_MULTIPLE,
                    steps: Mapping[str, int] | None = None, mlp_split: Optional[int] = None) -> 'LevelSpec':
        """The level spec of a dense HF config or a DarwinLM (already pruned) config.

        ``num_levels``: ``None`` takes the number a DarwinLM config records, else :func:`auto_num_levels` of
        the dense sizes (10 wherever the model has >= 10 heads).
        ``steps`` overrides the computed steps (e.g. from a database manifest). For a DarwinLM config the
        steps come, in order of preference, from ``steps``, ``config.level_steps``, or the dense sizes the
        config records (``num_attention_heads``, ``intermediate_size``). Raises ``ValueError`` when a kind has
        fewer than ``num_levels`` quanta (use a model with more heads / columns or pass fewer ``num_levels``)
        or when a unit's current count is not on a level (the model was pruned with other steps: pass them).
        ``mlp_split``: each nominal level's MLP step cut into this many finer MLP levels (``None``: what a
        DarwinLM config records, else 1); the MLP step must divide by it.
        """
        config = getattr(config, 'config', config)
        if mlp_multiple < 1:
            raise ValueError(f'mlp_multiple must be >= 1, got {mlp_multiple}')
        if num_levels is None:
            num_levels = getattr(config, 'num_levels', None) if getattr(config, 'model_type', None) == 'darwinlm' \
                else None
        if num_levels is None:
            num_levels = auto_num_levels(config.num_attention_heads, config.intermediate_size, mlp_multiple)
        num_levels = int(num_levels)
        if num_levels < 1:
            raise ValueError(f'num_levels must be >= 1, got {num_levels}')
        recorded = None
        if getattr(config, 'model_type', None) == 'darwinlm' and getattr(config, 'level_steps', None):
            recorded = int(getattr(config, 'mlp_level_split', None) or 1)  # the split its level_steps refer to
        if mlp_split is not None and recorded is not None and steps is None and int(mlp_split) != recorded:
            raise ValueError(f'this model was pruned with mlp_level_split={recorded} (its level_steps refer to it); '
                             f'gradual pruning keeps it: leave mlp_level_split out, or set it to {recorded}.')
        mlp_split = int(mlp_split or recorded or 1)
        if not 1 <= mlp_split <= MAX_MLP_SPLIT:
            raise ValueError(f'mlp_split (mlp_level_split) must lie in 1..{MAX_MLP_SPLIT}, got {mlp_split}')
        dense = {'attn': int(config.num_attention_heads), 'mlp': int(config.intermediate_size)}
        quantum = {'attn': 1, 'mlp': int(mlp_multiple)}
        if steps is None and getattr(config, 'model_type', None) == 'darwinlm':
            steps = getattr(config, 'level_steps', None)
        if steps is None:
            steps = {}
            for kind in KINDS:
                steps[kind] = _step(dense[kind], num_levels, quantum[kind])
                if steps[kind] == 0:
                    what = 'query heads' if kind == 'attn' else f'MLP columns (in multiples of {mlp_multiple})'
                    raise ValueError(
                        f'{kind}: {dense[kind]} {what} cannot be split into {num_levels} equal non-empty steps; '
                        f'use a model with at least {num_levels * quantum[kind]} of them, a smaller '
                        f'num_levels{"" if kind == "attn" else " or a smaller mlp_multiple"}.')
            if steps['mlp'] % mlp_split:
                raise ValueError(f'mlp: the level step of {steps["mlp"]} columns cannot be split into {mlp_split} '
                                 f'equal finer steps; use an mlp_split that divides it.')
            steps['mlp'] //= mlp_split
        steps = {kind: int(steps[kind]) for kind in KINDS}
        if steps['mlp'] % quantum['mlp']:
            quantum['mlp'] = 1  # recorded steps win: a database made with another multiple stays usable
        qkv_bias, o_bias, mlp_bias = _biases(config)
        family = getattr(config, 'base_model_type', None) or getattr(config, 'model_type', 'llama')
        counts = _current_counts(config)
        current = {}
        for kind in KINDS:
            levels = []
            for layer, count in enumerate(counts[kind]):
                removed = dense[kind] - count
                level = removed // steps[kind] if steps[kind] else -1
                if removed % steps[kind] or not 0 <= level <= num_levels * (mlp_split if kind == 'mlp' else 1):
                    raise ValueError(
                        f'layer {layer} {kind} has {count} of {dense[kind]} structures, which is not a level of '
                        f'step {steps[kind]} (levels keep {dense[kind]} - level * {steps[kind]}); the model was '
                        f'pruned with other steps: pass them as steps={{...}} (a DarwinLM config records them '
                        f'in level_steps).')
                levels.append(level)
            current[kind] = tuple(levels)
        return cls(num_levels=num_levels, dense=dense, step=steps, quantum=quantum, current_levels=current,
                   head_dim=_head_dim(config), hidden_size=int(config.hidden_size),
                   vocab_size=int(config.vocab_size), num_key_value_heads=int(config.num_key_value_heads),
                   tie_word_embeddings=bool(getattr(config, 'tie_word_embeddings', False)),
                   qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, family=str(family), mlp_split=mlp_split)

    def to_dict(self) -> dict:
        """JSON-serialisable form (for the database manifest and the DarwinLM config)."""
        out = asdict(self)
        out['current_levels'] = {k: list(v) for k, v in self.current_levels.items()}
        if out['mlp_split'] == 1:  # the form written before finer MLP levels existed (same databases)
            del out['mlp_split']
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'LevelSpec':
        return cls(**data)

    @property
    def steps(self) -> dict[str, int]:
        """``{'attn': heads per level, 'mlp': columns per level}`` (what ``DarwinLMConfig.level_steps`` stores)."""
        return dict(self.step)

    def top(self, kind: str) -> int:
        """The top level of ``kind``: ``num_levels``, times ``mlp_split`` for the MLP."""
        return self.num_levels * (int(self.mlp_split) if kind == 'mlp' else 1)

    def kind_level(self, kind: str, level: int) -> int:
        """``kind``'s level that removes the same fraction as nominal ``level`` (``level * mlp_split`` for the MLP)."""
        return int(level) * (int(self.mlp_split) if kind == 'mlp' else 1)

    def uniform_levels(self, level: int) -> dict[str, list[int]]:
        """Every unit at nominal ``level``."""
        return {kind: [self.kind_level(kind, level)] * self.num_layers for kind in KINDS}

    def normalise(self, levels: 'LevelsLike') -> dict[str, list[int]]:
        """:func:`normalise_levels` for this spec: an int is a nominal uniform level (MLP levels scaled)."""
        return normalise_levels(self.uniform_levels(levels) if isinstance(levels, int) else levels, self.num_layers)

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.current_levels.values())))

    @property
    def is_grouped_query(self) -> bool:
        return self.num_key_value_heads != self.dense['attn']

    # ----------------------------------------------------------------------------------------------
    # Levels <-> counts
    # ----------------------------------------------------------------------------------------------
    def _check(self, kind: str, level: int) -> None:
        if kind not in KINDS:
            raise ValueError(f'unknown kind {kind!r}; kinds are {KINDS}')
        if not 0 <= level <= self.top(kind) or int(level) != level:
            raise ValueError(f'{kind} level {level!r} is outside 0..{self.top(kind)}')

    def keep(self, kind: str, level: int) -> int:
        """Structures (heads / columns) a unit of ``kind`` keeps at ``level``, counted in the dense model."""
        self._check(kind, level)
        return self.dense[kind] - int(level) * self.step[kind]

    def structure_size(self, kind: str) -> int:
        """Output-matrix columns per structure: ``head_dim`` for attention, 1 for the MLP."""
        return self.head_dim if kind == 'attn' else 1

    def remainder(self, kind: str) -> int:
        """Structures the top level keeps (0: the top level removes the unit)."""
        return self.keep(kind, self.top(kind))

    def levels_available(self, kind: str, layer: int) -> list[int]:
        """Levels a unit can take: from its current level up to the top (gradual mode starts higher)."""
        return list(range(self.current_levels[kind][layer], self.top(kind) + 1))

    def keep_counts(self, kind: str, layer: int) -> list[int]:
        """Kept counts of :meth:`levels_available`, in *current* structures (what the solver is asked for)."""
        return [self.keep(kind, l) for l in self.levels_available(kind, layer)]

    # ----------------------------------------------------------------------------------------------
    # Parameter counts (closed form; equals shrinking.parameter_count of the shrunk config)
    # ----------------------------------------------------------------------------------------------
    def unit_parameters(self, kind: str, level: int) -> int:
        """Parameters of one unit at ``level``: its matrices, biases and RMSNorm (0 when removed)."""
        k = self.keep(kind, level)
        if k == 0:
            return 0
        hidden, hd = self.hidden_size, self.head_dim
        if kind == 'attn':
            kv = self.num_key_value_heads if self.is_grouped_query else k  # MHA: K/V follow the query heads
            return hidden + (k + 2 * kv) * hd * (hidden + int(self.qkv_bias)) + k * hd * hidden + hidden * int(self.o_bias)
        return hidden + 2 * k * (hidden + int(self.mlp_bias)) + k * hidden + hidden * int(self.mlp_bias)

    def per_step_parameters(self, kind: str) -> int:
        """Parameters one level step adds/removes while the unit exists (the same for every level)."""
        return self.unit_parameters(kind, 0) - self.unit_parameters(kind, 1)

    def removal_overhead(self, kind: str) -> int:
        """Parameters freed by full removal beyond one ordinary step (0 when the top level is not removal)."""
        top = self.top(kind)
        if self.remainder(kind):
            return 0
        return self.unit_parameters(kind, top - 1) - self.per_step_parameters(kind)

    def max_exact_level(self, kind: str) -> int:
        """Highest level such that every switch among levels <= it is exactly parameter-neutral."""
        return self.top(kind) if self.removal_overhead(kind) == 0 else self.top(kind) - 1

    def fixed_parameters(self) -> int:
        """Parameters outside the prunable units: embeddings, LM head (unless tied), final norm."""
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def parameter_count(self, levels) -> int:
        """Exact parameter count of the model whose units sit at ``levels`` (see :func:`normalise_levels`; an int
        is a nominal uniform level)."""
        levels = self.normalise(levels)
        total = self.fixed_parameters()
        for kind in KINDS:
            total += sum(self.unit_parameters(kind, l) for l in levels[kind])
        return total

    def dense_parameter_count(self) -> int:
        return self.parameter_count(0)

    def current_parameter_count(self) -> int:
        return self.parameter_count({k: list(v) for k, v in self.current_levels.items()})

    # ----------------------------------------------------------------------------------------------
    # Report
    # ----------------------------------------------------------------------------------------------
    def report(self) -> str:
        """Human-readable table: per uniform level, heads / columns kept and the exact parameter count."""
        dense = self.dense_parameter_count()
        lines = [
            f'{self.family}: {self.num_layers} layers, attn {self.dense["attn"]} heads step {self.step["attn"]} '
            f'(top level keeps {self.remainder("attn")}), mlp {self.dense["mlp"]} columns step {self.step["mlp"]} '
            f'(top level keeps {self.remainder("mlp")})' + (f', {self.mlp_split} MLP levels per level'
                                                            if self.mlp_split > 1 else ''),
            f'{"level":>5} {"heads":>6} {"mlp cols":>9} {"parameters":>15} {"of dense":>9}',
        ]
        for level in range(self.num_levels + 1):
            params = self.parameter_count(level)
            lines.append(f'{level:>5} {self.keep("attn", level):>6} {self.keep("mlp", self.kind_level("mlp", level)):>9} '
                         f'{params:>15,} {params / dense:>9.4f}')
        for kind in KINDS:
            if self.max_exact_level(kind) < self.top(kind):
                lines.append(f'note: {kind} level {self.top(kind)} removes the unit and frees '
                             f'{self.removal_overhead(kind):,} parameters more than a step; switches are exactly '
                             f'size-neutral up to level {self.max_exact_level(kind)}.')
        if any(any(v) for v in self.current_levels.values()):
            lines.append(f'current model: {self.current_parameter_count():,} parameters; levels '
                         f'attn {list(self.current_levels["attn"])} mlp {list(self.current_levels["mlp"])}')
        return '\n'.join(lines)


LevelsLike = Union[int, Mapping, Any]


def normalise_levels(levels: LevelsLike, num_layers: int) -> dict[str, list[int]]:
    """``{'attn': [...], 'mlp': [...]}`` from an int (uniform), such a mapping, a ``{Unit: level}`` mapping
    (every unit listed) or any object with ``attn`` / ``mlp`` sequences (``search.space.LevelConfig``)."""
    if isinstance(levels, int):
        return {k: [levels] * num_layers for k in KINDS}
    if hasattr(levels, 'attn') and hasattr(levels, 'mlp') and not isinstance(levels, Mapping):
        levels = {'attn': levels.attn, 'mlp': levels.mlp}
    if isinstance(levels, Mapping) and set(levels) == set(KINDS):
        out = {k: [int(v) for v in levels[k]] for k in KINDS}
    elif isinstance(levels, Mapping):
        out = {k: [None] * num_layers for k in KINDS}
        for unit, level in levels.items():
            kind, layer = getattr(unit, 'kind', None), getattr(unit, 'layer', None)
            if kind not in KINDS or layer is None or not 0 <= layer < num_layers:
                raise ValueError(f'level key {unit!r} is not a Unit of a {num_layers}-layer model')
            out[kind][layer] = int(level)
        missing = [f'{k}[{i}]' for k in KINDS for i, v in enumerate(out[k]) if v is None]
        if missing:
            raise ValueError(f'levels are missing for units {missing}; give a level to every unit')
    else:
        raise ValueError(f"levels must be an int, {{'attn': [...], 'mlp': [...]}}, a {{Unit: level}} mapping or a "
                         f'LevelConfig; got {type(levels).__name__}')
    for k in KINDS:
        if len(out[k]) != num_layers:
            raise ValueError(f'{k} has {len(out[k])} levels for {num_layers} layers')
    return out


def parameter_count(config_or_spec, levels: LevelsLike, **spec_kwargs) -> int:
    """Exact parameter count of the model (from a config or a :class:`LevelSpec`) with units at ``levels``."""
    spec = config_or_spec if isinstance(config_or_spec, LevelSpec) else LevelSpec.from_config(
        config_or_spec, **spec_kwargs)
    return spec.parameter_count(levels)
