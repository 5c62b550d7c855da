"""Multi-step, training-aware selection of one DarwinLM generation (pure driver, no randomness).

Step ``k`` of a generation fine-tunes every remaining candidate on ``train_tokens[k]`` tokens, measures its
fitness (lower is better, e.g. KL to the dense model) on ``fitness_tokens[k]`` tokens, and keeps the best
``survivors[k]``. The parent joins the last step (elitism): it is trained and measured with the last step's
budget next to the remaining offspring, and stays the parent unless an offspring does strictly better (by
more than ``replace_margin`` of the parent's fitness, where that is set).

What "train" and "measure" mean is the caller's business: :func:`run_generation` receives an
``evaluate(candidates, step_index) -> list[float]`` callback. In the paper (and here) every step starts
each candidate afresh from the database weights; training is not carried over between steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

from darwinlm_foundry.utils.config import from_mapping

__all__ = ['SelectionSchedule', 'StepRecord', 'GenerationResult', 'run_generation', 'rank', 'PARENT']

#: Candidate id of the parent in :class:`StepRecord` (offspring are 0..n-1).
PARENT = -1


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, '__iter__'):
        raise ValueError(f'{name} must be a list of integers, got {values!r}')
    out = []
    for v in values:
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f'{name} must be a list of integers, got {values!r}')
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True)
class SelectionSchedule:
    """Selection settings of one generation (defaults: the paper's).

    - ``survivors[k]``: candidates kept after step k; strictly decreasing, last is 1.
    - ``fitness_tokens[k]``: tokens the fitness is measured on in step k (> 0).
    - ``train_tokens[k]``: fine-tuning tokens per candidate before measuring in step k (>= 0; all zero means
      plain, training-free selection).
    - ``lr``: fine-tuning learning rate; ``offspring``: offspring per generation (>= survivors[0]).
    - ``replace_margin``: in the last step an offspring replaces the parent only when its fitness is below
      ``(1 - replace_margin)`` times the parent's (0: any strict improvement, the paper's). Most offspring of a
      good parent are worse than it, so where the last step's sample cannot tell them apart, a bare win is more
      often luck than gain.
    """

    survivors: tuple[int, ...] = (8, 4, 2, 1)
    fitness_tokens: tuple[int, ...] = (1024, 2048, 4096, 8192)
    train_tokens: tuple[int, ...] = (10_000, 50_000, 100_000, 200_000)
    lr: float = 1e-5
    offspring: int = 16
    replace_margin: float = 0.0

    def __post_init__(self):
        for name in ('survivors', 'fitness_tokens', 'train_tokens'):
            object.__setattr__(self, name, _int_tuple(name, getattr(self, name)))
        s, f, t = self.survivors, self.fitness_tokens, self.train_tokens
        if not s:
            raise ValueError('survivors must list at least one selection step')
        if not len(s) == len(f) == len(t):
            raise ValueError(f'survivors ({len(s)}), fitness_tokens ({len(f)}) and train_tokens ({len(t)}) '
                             f'must have one entry per selection step')
        if any(b >= a for a, b in zip(s, s[1:])):
            raise ValueError(f'survivors must be strictly decreasing, got {list(s)}')
        if s[-1] != 1:
            raise ValueError(f'the last selection step must keep exactly 1 survivor, got {list(s)}')
        if isinstance(self.offspring, bool) or int(self.offspring) != self.offspring or self.offspring < 1:
            raise ValueError(f'offspring must be a positive integer, got {self.offspring!r}')
        object.__setattr__(self, 'offspring', int(self.offspring))
        if s[0] > self.offspring:
            raise ValueError(f'the first step keeps {s[0]} survivors but only {self.offspring} offspring are '
                             f'made; lower survivors[0] or raise offspring')
        if any(x <= 0 for x in f):
            raise ValueError(f'fitness_tokens must be positive, got {list(f)}')
        if any(x < 0 for x in t):
            raise ValueError(f'train_tokens must be >= 0 (0 = no training-aware selection), got {list(t)}')
        lr = float(self.lr)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f'lr must be a positive number, got {self.lr!r}')
        object.__setattr__(self, 'lr', lr)
        margin = float(self.replace_margin)
        if not 0 <= margin < 1:
            raise ValueError(f'replace_margin must lie in [0, 1) (a fraction of the parent\'s fitness), got '
                             f'{self.replace_margin!r}')
        object.__setattr__(self, 'replace_margin', margin)

    @property
    def num_steps(self) -> int:
        return len(self.survivors)

    @property
    def training_aware(self) -> bool:
        """Whether any step fine-tunes candidates before measuring them."""
        return any(self.train_tokens)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'SelectionSchedule':
        """Build from a config mapping; unknown keys are an error that names them."""
        return from_mapping(cls, data, 'selection schedule')


@dataclass
class StepRecord:
    """What one selection step saw: candidate ids (offspring index, or PARENT), their fitness, kept ids."""

    step: int
    candidates: list[int]
    fitnesses: list[float]
    kept: list[int]
    train_tokens: int
    fitness_tokens: int


@dataclass
class GenerationResult:
    """Outcome of one generation: the winner (next parent), its last-step fitness, and per-step records."""

    winner: Any
    fitness: float
    parent_won: bool
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def step_fitnesses(self) -> list[list[float]]:
        return [s.fitnesses for s in self.steps]

    def to_dict(self) -> dict:
        """JSON-friendly summary (the winner via its ``to_dict`` when it has one)."""
        winner = self.winner.to_dict() if hasattr(self.winner, 'to_dict') else self.winner
        return {'winner': winner, 'fitness': self.fitness, 'parent_won': self.parent_won,
                'steps': [asdict(s) for s in self.steps]}


def _sort_key(fitness: float) -> float:
    # A diverged fine-tune can give NaN; rank it last instead of corrupting the order.
    return math.inf if math.isnan(fitness) else fitness


def rank(fitnesses: Sequence[float]) -> list[int]:
    """Positions sorted by fitness, lowest first; ties keep list order; NaN ranks last."""
    return sorted(range(len(fitnesses)), key=lambda i: (_sort_key(fitnesses[i]), i))


def run_generation(parent: Hashable, offspring: Sequence[Hashable], schedule: SelectionSchedule,
                   evaluate: Callable[[list, int], Sequence[float]]) -> GenerationResult:
    """Run the multi-step selection of one generation and return its winner.

    ``evaluate(candidates, k)`` fine-tunes each candidate for ``schedule.train_tokens[k]`` tokens and returns
    its fitness on ``schedule.fitness_tokens[k]`` tokens, lower is better, one float per candidate.

    Step k (k < last) keeps the best ``survivors[k]`` of the remaining offspring, in fitness order. The last
    step evaluates ``[parent] + remaining offspring`` and keeps the best one; the parent comes first so that
    it wins ties (an offspring must do strictly better to replace it, and with ``replace_margin`` better than
    ``(1 - replace_margin)`` times the parent's fitness). All ties go to the earlier candidate.
    With fewer offspring than a step's survivors, all of them go on. Deterministic: no randomness inside.
    """
    offspring = list(offspring)
    if parent in offspring:
        raise ValueError('the parent is among the offspring; offspring must differ from the parent')
    if len(set(offspring)) != len(offspring):
        raise ValueError('offspring contain duplicates; make them distinct (make_offspring does)')

    remaining = list(range(len(offspring)))  # ids of the offspring still in the race
    steps: list[StepRecord] = []
    last = schedule.num_steps - 1
    for k in range(schedule.num_steps):
        ids = [PARENT] + remaining if k == last else remaining
        if not ids:
            continue
        candidates = [parent if i == PARENT else offspring[i] for i in ids]
        fitnesses = [float(x) for x in evaluate(candidates, k)]
        if len(fitnesses) != len(candidates):
            raise RuntimeError(f'evaluate returned {len(fitnesses)} fitness values for {len(candidates)} '
                               f'candidates in selection step {k}; it must return one per candidate')
        order = rank(fitnesses)[:schedule.survivors[k]]
        # an offspring that won the last step by no more than the margin leaves the parent (a NaN parent never stays)
        if (k == last and ids[order[0]] != PARENT and not math.isnan(fitnesses[0])
                and fitnesses[order[0]] >= fitnesses[0] * (1 - schedule.replace_margin)):
            order = [0]
        kept = [ids[j] for j in order]
        steps.append(StepRecord(step=k, candidates=ids, fitnesses=fitnesses, kept=kept,
                                train_tokens=schedule.train_tokens[k], fitness_tokens=schedule.fitness_tokens[k]))
        if k == last:
            best = order[0]
            winner_id = ids[best]
            return GenerationResult(winner=parent if winner_id == PARENT else offspring[winner_id],
                                    fitness=fitnesses[best], parent_won=winner_id == PARENT, steps=steps)
        remaining = kept
    raise AssertionError('unreachable: the last step always runs with the parent')
