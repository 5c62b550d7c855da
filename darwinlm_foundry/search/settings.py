"""The search's settings: one typed, frozen record of every knob (unknown keys are an error naming the key)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from darwinlm_foundry.search.selection import SelectionSchedule
from darwinlm_foundry.search.space import DEFAULT_MAX_SWITCHES, MAX_LEVEL
from darwinlm_foundry.utils.config import from_mapping

__all__ = ['SearchSettings']

_FITNESS = ('kl', 'topk_kl', 'ppl')
_DIST_MODES = ('auto', 'offspring_parallel', 'fsdp')
_DEVICES = ('auto', 'cpu', 'cuda')
_PRECISIONS = ('auto', 'fp32', 'amp_bf16')
_WINNER_RULES = ('auto', 'last', 'best_probe')


def _tuple_of_ints(value) -> tuple[int, ...]:
    if isinstance(value, (int, str)):
        raise ValueError(f'expected a list of integers, got {value!r}')
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class SearchSettings:
    """Everything that configures one search (validated on construction; :meth:`from_dict` for YAML).

    Start: ``target_level`` (uniform start, e.g. 5) or ``start_config`` (a ``winner.json`` / ``layer: level``
    text file, e.g. the previous gradual stage's result), then ``extra_levels`` more levels per unit on average
    in each group spread at random (seeded; gradual mode, e.g. 1 for level 5 -> 6).
    Selection (paper defaults): ``generations`` (a total: a finished search run again with a larger number
    continues from its state), ``offspring``, ``survivors``, ``fitness_tokens``,
    ``train_tokens``, ``lr``; ``replace_margin`` (default 0, the paper's: any strict improvement): an offspring
    replaces the parent only when its last-step fitness is below ``(1 - replace_margin)`` times the parent's, on
    the same tokens (:class:`~darwinlm_foundry.search.selection.SelectionSchedule`). Data: ``seq_len`` tokens per sequence; a fit runs
    ``ceil(train_tokens / seq_len)`` sequences in optimizer steps of ``train_batch_size`` sequences,
    ``micro_batch_size`` at a time (also the fitness batch). Fitness: ``'kl'``, ``'topk_kl'`` (dense top-``topk``
    stored, for 128K vocabularies) or ``'ppl'``. ``max_level``: highest level a unit may take (default: the
    highest level at which level switches keep the parameter count exact, from the database). Mutation:
    ``max_switches`` -- an offspring makes min(U{1,m}, U{1,m}) level switches, m = ``max_switches`` (default 3:
    mostly one; larger m takes bigger steps). ``samples_by_source``: fitness and probe samples drawn balanced over
    the split's source files (seeded rounds, one sequence of each source per round; needs an MDS split by
    ``data.convert_to_mds``) instead of proportional to their size: with a mix of domains, a selection step's
    few sequences otherwise hold only the largest ones, and offspring that help those and hurt the rest win.
    ``balance_kinds``: before the first generation, score every start that moves whole exchanges of equal
    parameter cost between attention and MLP levels (:func:`~darwinlm_foundry.search.space.kind_balance_candidates`,
    an even spread over the units) on one fixed sample of ``balance_tokens`` tokens (default ``fitness_tokens[-1]``),
    without fine-tuning, and
    start from the fittest: mutation never moves levels between kinds, so otherwise the share of the cut on
    attention stays the uniform start's (SmolLM2-135M at level 5: keeping attention dense and pruning the MLP
    further is 0.69x the uniform model's held-out perplexity before any search, ``bench/kind_balance.py``).
    Off by default: the paper starts from the uniform model.
    ``protect_units``: then, up to this many rounds on the same sample, each scoring every start that protects one
    unit (it gives back half its kind's mean level, spread over the others: exactly the same size,
    :func:`~darwinlm_foundry.search.space.unit_protection_candidates`) and keeping the fittest when it beats the
    current start. One-level switches are too small to find a unit far more sensitive than the rest through a
    sample's noise (SmolLM2-135M's first MLP layer: protecting it alone takes the kind-balanced start from 0.69x
    to 0.58x the uniform model's held-out perplexity). Each round has up to one candidate per unit, screened
    through the selection's steps (all on the sample's first ``fitness_tokens[0]`` tokens, the best
    ``survivors[0]`` on the next, ..., the last ones on the whole sample). 0 (off) by default.
    ``balance_top``: with ``protect_units``, the split and its protections are chosen together: each of the kind
    balance's ``balance_top`` fittest splits (the balance's pick first) is protected, and the fittest protected
    start on the same sample is kept (ties to the balance's pick). The split alone is chosen before the unit worth
    protecting is: a split that protects well can lose to one that only looks better unprotected (SmolLM2-135M at
    level 5, seed 1: the 2nd split protected is 1.359 against 1.411, 0.515x against 0.574x the uniform model's
    held-out perplexity, ``bench/joint_start.py``). Costs ``balance_top - 1`` more protection rounds; 1 (default):
    the balance's pick alone.
    ``balance_recheck_tokens``: the start's finalists are scored again on a fresh sample of this many tokens and
    the fittest there is kept: the kind balance's best 3 splits, or with ``balance_top`` > 1 the protected
    splits (None: the first sample decides; the choice of the start is made on one sample, and its finalists
    differ by less than that sample's noise). Its dense targets go to a scratch file above ``spill_targets_mib``,
    so a large sample costs time, not memory.
    Probe: ``probe_tokens`` -- after every generation the parent, as stitched (no fine-tuning), is also scored
    on one fixed probe sample of this many tokens (the same tokens every generation, drawn with a fixed seed;
    default: the last ``fitness_tokens`` step; 0: no probe) and recorded as ``probe_fitness``: the selection's
    own fitness is measured on fresh samples every generation and so jumps, the probe fitness is comparable
    across generations. It never influences the search and is not fingerprinted (a state written before the
    setting existed resumes), but a resume must keep its size.
    ``winner``: which parent the search returns. ``'last'``: the parent after the last generation (the paper's).
    ``'best_probe'``: the parent (the start included) with the lowest probe fitness, the earliest on ties, as one
    keeps the checkpoint with the best validation loss: when a fitness sample is too small to tell a level switch
    from noise, the selection takes worse offspring about as often as better ones and the parent drifts (SmolLM2
    at level 5, 2,048 fitness tokens: one seed's start 0.656x the uniform model's held-out perplexity, its parent
    after 10 generations 0.737x). ``'auto'`` (default): ``'best_probe'`` for one-shot selection with a probe,
    ``'last'`` with training-aware selection (the probe scores parents untrained, the selection trained). It
    picks among the parents of the trajectory, which it does not change (not fingerprinted).
    Runtime (not part of the fingerprint): ``output_dir``, ``device``, ``precision`` (``'auto'``: ``amp_bf16`` on a
    GPU, ``fp32`` on a CPU; ``amp_bf16`` on a CPU autocasts the candidates' forwards and fits to bf16 while the
    dense targets and the KL itself stay fp32: where the CPU has AMX tiles a SmolLM2 KL-only search runs 1.35x
    faster end to end with the same winners, ``bench/search_precision.py``), ``distributed``,
    ``keep_dense_resident``, ``dense_cache_dir`` (memory-map dense targets there; None keeps them in memory),
    ``progress_bar``, ``activation_checkpointing`` (fine-tuning fits recompute each layer's activations in the
    backward pass instead of keeping them: the same weights bit for bit, less memory, a slower fit),
    ``spill_targets_mib`` (a fine-tuning step whose dense targets take more than this many MiB keeps them in a
    scratch file while its candidates train, read back a micro-batch at a time; smaller ones stay in memory,
    where writing and re-reading them would cost more than they weigh; 0: always spill; same values either way).
    """

    target_level: Optional[int] = 5
    start_config: Optional[str] = None
    extra_levels: float = 0
    generations: int = 200
    offspring: int = 16
    survivors: tuple = (8, 4, 2, 1)
    fitness_tokens: tuple = (1024, 2048, 4096, 8192)
    train_tokens: tuple = (10_000, 50_000, 100_000, 200_000)
    lr: float = 1e-5
    seq_len: int = 512
    train_batch_size: int = 8
    micro_batch_size: int = 4
    fitness: str = 'kl'
    topk: Optional[int] = None
    max_level: Optional[int] = None
    max_switches: int = DEFAULT_MAX_SWITCHES
    replace_margin: float = 0.0
    samples_by_source: bool = False
    balance_kinds: bool = False
    balance_tokens: Optional[int] = None
    protect_units: int = 0
    balance_top: int = 1
    balance_recheck_tokens: Optional[int] = None
    seed: int = 0
    output_dir: str = 'darwinlm_search'
    device: str = 'auto'
    precision: str = 'auto'
    distributed: str = 'auto'
    keep_dense_resident: bool = False
    dense_cache_dir: Optional[str] = None
    progress_bar: bool = True
    probe_tokens: Optional[int] = None
    winner: str = 'auto'
    activation_checkpointing: bool = False
    spill_targets_mib: float = 256

    # Fields that may change between a run and its resume without changing the result.
    RUNTIME_FIELDS = ('output_dir', 'device', 'precision', 'distributed', 'keep_dense_resident', 'dense_cache_dir',
                      'progress_bar', 'activation_checkpointing', 'spill_targets_mib')
    # Fields that do not change the search (left out of the fingerprint, so states written before they existed
    # still resume), but are checked on resume by other means (the probe size is recorded in the state).
    # ``generations`` is a total to run to: a finished search resumes with a larger one and continues.
    # ``winner`` picks among the parents of a finished trajectory, which it does not change.
    UNFINGERPRINTED_FIELDS = ('probe_tokens', 'generations', 'winner')

    def __post_init__(self):
        for name in ('survivors', 'fitness_tokens', 'train_tokens'):
            try:
                object.__setattr__(self, name, _tuple_of_ints(getattr(self, name)))
            except (TypeError, ValueError) as err:
                raise ValueError(f'{name} must be a list of integers, got {getattr(self, name)!r}') from err
        if (self.target_level is None) == (self.start_config is None):
            raise ValueError('give exactly one of target_level (uniform start) and start_config (a file with the '
                             'starting levels)')
        if self.target_level is not None and not 0 <= int(self.target_level) <= MAX_LEVEL:
            raise ValueError(f'target_level must lie in 0..{MAX_LEVEL}, got {self.target_level}')
        if float(self.extra_levels) < 0:
            raise ValueError(f'extra_levels must be >= 0, got {self.extra_levels}')
        if self.probe_tokens is not None:
            if isinstance(self.probe_tokens, bool) or int(self.probe_tokens) != self.probe_tokens:
                raise ValueError(f'probe_tokens must be an integer (0: no probe), got {self.probe_tokens!r}')
            object.__setattr__(self, 'probe_tokens', int(self.probe_tokens))
        for name in ('generations', 'probe_tokens'):
            if getattr(self, name) is not None and int(getattr(self, name)) < 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
        if float(self.spill_targets_mib) < 0:
            raise ValueError(f'spill_targets_mib must be >= 0 (0: always spill), got {self.spill_targets_mib}')
        for name in ('seq_len', 'train_batch_size', 'micro_batch_size'):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.fitness not in _FITNESS:
            raise ValueError(f'fitness must be one of {_FITNESS}, got {self.fitness!r}')
        if self.fitness == 'topk_kl' and not (self.topk and int(self.topk) >= 1):
            raise ValueError("fitness 'topk_kl' needs topk >= 1 (how many dense logits to keep per token)")
        if isinstance(self.max_switches, bool) or int(self.max_switches) != self.max_switches or self.max_switches < 1:
            raise ValueError(f'max_switches must be an integer >= 1, got {self.max_switches!r}')
        if not isinstance(self.samples_by_source, bool):
            raise ValueError(f'samples_by_source must be true or false, got {self.samples_by_source!r}')
        if not isinstance(self.balance_kinds, bool):
            raise ValueError(f'balance_kinds must be true or false, got {self.balance_kinds!r}')
        if isinstance(self.protect_units, bool) or int(self.protect_units) != self.protect_units or \
                self.protect_units < 0:
            raise ValueError(f'protect_units must be an integer >= 0 (rounds; 0: off), got {self.protect_units!r}')
        if isinstance(self.balance_top, bool) or int(self.balance_top) != self.balance_top or self.balance_top < 1:
            raise ValueError(f'balance_top must be an integer >= 1 (splits protected; 1: the kind balance\'s pick '
                             f'alone), got {self.balance_top!r}')
        if self.balance_top > 1 and not (self.balance_kinds and self.protect_units):
            raise ValueError(f'balance_top: {self.balance_top} protects each of the kind balance\'s fittest splits: '
                             'it needs balance_kinds: true and protect_units >= 1 (or set balance_top: 1)')
        if self.balance_recheck_tokens is not None and (
                isinstance(self.balance_recheck_tokens, bool) or
                int(self.balance_recheck_tokens) != self.balance_recheck_tokens or self.balance_recheck_tokens < 1):
            raise ValueError(f'balance_recheck_tokens must be a positive integer (None: no re-check), got '
                             f'{self.balance_recheck_tokens!r}')
        if self.balance_tokens is not None and (isinstance(self.balance_tokens, bool) or
                                                int(self.balance_tokens) != self.balance_tokens or
                                                self.balance_tokens < 1):
            raise ValueError(f'balance_tokens must be a positive integer (None: fitness_tokens[-1]), got '
                             f'{self.balance_tokens!r}')
        if self.max_level is not None and not 0 <= int(self.max_level) <= MAX_LEVEL:
            raise ValueError(f'max_level must lie in 0..{MAX_LEVEL}, got {self.max_level}')
        if self.device not in _DEVICES:
            raise ValueError(f'device must be one of {_DEVICES}, got {self.device!r}')
        if self.precision not in _PRECISIONS:
            raise ValueError(f'precision must be one of {_PRECISIONS}, got {self.precision!r}')
        if self.winner not in _WINNER_RULES:
            raise ValueError(f'winner must be one of {_WINNER_RULES}, got {self.winner!r}')
        if self.winner == 'best_probe' and not self.probe_size:
            raise ValueError("winner: best_probe picks the parent by its probe fitness: set probe_tokens > 0 (or "
                             "leave it unset), or use winner: last")
        if self.distributed not in _DIST_MODES:
            raise ValueError(f'distributed must be one of {_DIST_MODES}, got {self.distributed!r}')
        self.schedule  # validates survivors / tokens / lr / offspring together

    @property
    def schedule(self) -> SelectionSchedule:
        return SelectionSchedule(survivors=self.survivors, fitness_tokens=self.fitness_tokens,
                                 train_tokens=self.train_tokens, lr=self.lr, offspring=self.offspring,
                                 replace_margin=self.replace_margin)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'SearchSettings':
        """From a config mapping (e.g. a YAML block); unknown keys are an error naming them."""
        return from_mapping(cls, data, 'search settings')

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def result_fields(self, legacy: bool = False) -> dict:
        """The settings that determine the result (fingerprinted; runtime fields, the probe and the number of
        generations left out). ``legacy``: with ``generations``, as states written before searches could be
        extended were fingerprinted (they resume with the same number)."""
        fields = {k: v for k, v in self.to_dict().items()
                  if k not in self.RUNTIME_FIELDS and k not in self.UNFINGERPRINTED_FIELDS}
        if legacy:
            fields['generations'] = self.generations
        if fields['max_switches'] == DEFAULT_MAX_SWITCHES:  # states written before the setting existed resume
            del fields['max_switches']
        if not fields['samples_by_source']:  # likewise
            del fields['samples_by_source']
        if not fields['balance_kinds']:  # likewise
            del fields['balance_kinds']
        if fields['balance_tokens'] is None:
            del fields['balance_tokens']
        if not fields['protect_units']:  # likewise
            del fields['protect_units']
        if fields['balance_recheck_tokens'] is None:
            del fields['balance_recheck_tokens']
        if fields['balance_top'] == 1:  # likewise
            del fields['balance_top']
        if not fields['replace_margin']:  # likewise
            del fields['replace_margin']
        return fields

    @property
    def winner_rule(self) -> str:
        """``winner`` resolved: ``'auto'`` is ``'best_probe'`` for one-shot selection with a probe, else ``'last'``."""
        if self.winner != 'auto':
            return self.winner
        return 'best_probe' if self.probe_size and not any(self.train_tokens) else 'last'

    @property
    def probe_size(self) -> int:
        """Tokens of the fixed probe sample (``probe_tokens``, default the last fitness step; 0: none)."""
        return int(self.fitness_tokens[-1]) if self.probe_tokens is None else int(self.probe_tokens)
