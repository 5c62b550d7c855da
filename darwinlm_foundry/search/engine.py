"""The DarwinLM evolutionary search engine: stitch offspring, fine-tune them with short Composer fits, select.

One generation (see :mod:`darwinlm_foundry.search.selection`): the parent makes ``offspring`` mutants of the same size;
in selection step ``k`` every remaining candidate is **stitched from the sparsity database as a physically
shrunk** ``DarwinLMForCausalLM`` (never a dense model with zeros), fine-tuned with a short Composer
``Trainer.fit`` on ``train_tokens[k]`` tokens (lr 1e-5; 0 tokens = one-shot selection), and scored on
``fitness_tokens[k]`` tokens: KL(dense || candidate) of the next-token distributions (or its top-k form, or
perplexity). Each step starts every candidate afresh from its database weights, as in the paper.

Samples are fresh per generation and step and drawn from a seed, the generation and the step only, so a
killed search resumes bit for bit (the mutation RNG is saved with the state after every generation, see
:mod:`darwinlm_foundry.search.state`). Because fresh samples make the selection's fitness jump from one
generation to the next, the new parent is also scored (as stitched, no fine-tuning) on one fixed probe sample
after every generation (``probe_tokens``; ``probe_fitness`` in the history, ``winner.json`` and the logs): that
curve is comparable across generations. It uses no random state of the search.

Memory (bench/search_memory.py on SmolLM2-135M, 49152-token vocabulary; yamls/darwinlm_smollm2.yaml's one-shot
search: peak RSS 7.5 GB before these measures, 3.0 GB with them, the same winners and fitness bit for bit):
dense targets are computed once per sample through :class:`~darwinlm_foundry.search.fitness.DenseLogitCache`, one
micro-batch of sequences at a time, and kept only in the form the KL reads (``p`` and ``sum p log p``: no
logits next to them, no whole-sample temporaries); a step's targets are computed when the step starts and
dropped when it ends (in a scratch file while candidates fine-tune); the probe's live in a scratch file, read
back a micro-batch at a time. The dense model is built from the database's source tensors only to compute
targets and released afterwards unless ``keep_dense_resident``; the memory maps of the checkpoint and database
files are closed after every stitch (their touched pages would otherwise stay resident); a fine-tuned
candidate's optimizer state, Trainer and freed heap are given back after its fit, so fine-tuning searches no
longer grow fit after fit (``activation_checkpointing`` lowers a fit's own peak further).

Distributed (``torch.distributed`` initialised, W ranks): every rank runs the same search with the same RNG
stream, fitness values are summed over ranks (exactly one rank contributes each, so every rank holds the
same floats) and hence every rank takes the same decisions. Modes:

* ``offspring_parallel`` -- rank r evaluates candidates r, r+W, ... with a *rank-local* Composer fit:
  :func:`composer_rank_local` makes Composer see a one-process world (no DDP, no dist sampler, no
  collectives inside the fit) while the process group stays up for the engine's own all-reduce.
* ``fsdp`` -- for offspring that do not fit one device: every candidate is fitted by all ranks together, its
  Composer fit sharded with FSDP, each rank training on and scoring its share of the rows (the largest
  multiple of W rows of each sample, so every rank runs the same number of steps and forwards). Composer's
  FSDP needs CUDA; on CPU the same mode runs the fit data-parallel (Composer's DDP, full replicas), which
  keeps the collective logic testable under ``composer -n 2``.
* ``auto`` picks ``offspring_parallel`` when the estimated fit memory of one candidate fits the device.

Composer is imported lazily (only when a fit runs), so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

import torch

from darwinlm_foundry.search.candidates import CandidateScoring, _TokenBatches
from darwinlm_foundry.search.fitness import DenseLogitCache
from darwinlm_foundry.search.selection import GenerationResult
from darwinlm_foundry.search.settings import SearchSettings
from darwinlm_foundry.search.space import (GROUPS, LevelBounds, LevelConfig, kind_balance_candidates, kind_exchange,
                                           make_rng, spread_extra_levels, uniform, unit_protection_candidates)
from darwinlm_foundry.search.state import SearchState, best_probe_generation, run_search, settings_fingerprint
from darwinlm_foundry.search.tokens import ShardTokens, TensorTokens, TokenSource, derive_seed
from darwinlm_foundry.utils.dist import broadcast_object, local_rank, torch_world
from darwinlm_foundry.utils.io import atomic_write_text

__all__ = ['SearchResult', 'EvolutionarySearch', 'STATE_FILE', 'WINNER_JSON', 'WINNER_TEXT']

log = logging.getLogger(__name__)

BALANCE_RECHECK_TOP = 3  # kind-balance splits re-scored with balance_recheck_tokens
STATE_FILE = 'search_state.json'
WINNER_JSON = 'winner.json'
WINNER_TEXT = 'winner.txt'


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """The winner and how the search got there (also written to ``output_dir``)."""

    winner: LevelConfig
    fitness: Optional[float]
    parameters: int
    dense_parameters: int
    generations: int
    history: list = field(default_factory=list)
    mode: str = 'single'
    json_path: Optional[str] = None
    text_path: Optional[str] = None
    probe_fitness: Optional[float] = None
    start_probe_fitness: Optional[float] = None
    winner_generation: Optional[int] = None  # the winner is the parent after this generation (0: the start)
    winner_rule: str = 'last'

    def fitness_history(self) -> list:
        """The winner's last-step fitness per generation (each on that generation's fresh sample)."""
        return [h['fitness'] for h in self.history]

    def probe_fitness_history(self) -> list:
        """The parent's fitness on the fixed probe sample per generation (None where not recorded)."""
        return [h.get('probe_fitness') for h in self.history]

    def to_dict(self) -> dict:
        """``fitness``: the winner's last-step fitness (the start's probe fitness when the winner is the start,
        or None); ``probe_fitness``: the winner's fitness on the fixed probe sample (None without a probe);
        ``winner_generation``: the generation after which the winner was the parent (0: the start), by
        ``winner_rule`` (``SearchSettings.winner``)."""
        return {'levels': self.winner.to_dict(), 'fitness': self.fitness, 'parameters': self.parameters,
                'dense_parameters': self.dense_parameters, 'generations': self.generations,
                'winner_generation': self.winner_generation, 'winner_rule': self.winner_rule,
                'fitness_history': self.fitness_history(), 'probe_fitness': self.probe_fitness,
                'start_probe_fitness': self.start_probe_fitness,
                'probe_fitness_history': self.probe_fitness_history(), 'mode': self.mode}


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------
class EvolutionarySearch(CandidateScoring):
    """Runs (or resumes) the search over ``database`` and writes the winner. Same object on every rank.

    This class holds the generation loop (start, resume, selection steps, probe, outputs); making and scoring
    one candidate (stitch -> shrink -> short Composer fit -> fitness) is
    :class:`~darwinlm_foundry.search.candidates.CandidateScoring`, which it mixes in.

    ``database``: an opened :class:`~darwinlm_foundry.obs.database.SparsityDatabase`. ``dense_get_tensor``: tensors
    of the model the database was built from (:func:`~darwinlm_foundry.obs.database.dense_tensor_getter` over a
    checkpoint directory or an in-memory model). ``data``: a :class:`TokenSource` (or a split directory /
    token tensor) for the fine-tuning and fitness samples. ``tokenizer``: handed to every fit's
    ``HuggingFaceModel`` (one object, reused). ``log_fn(metrics, step)``: per-generation metrics (e.g.
    Composer's ``logger.log_metrics``). ``candidate_hook(config, model)``: called with every stitched
    model before it is trained (tests, inspection). ``offspring_format``: ``'shrunk'`` (always, in real
    use) or ``'masked'`` (the research code's zeroed dense copy; for the throughput benchmark only).
    """

    def __init__(self, settings: SearchSettings, database, dense_get_tensor: Callable[[str], torch.Tensor],
                 data: Union[TokenSource, str, os.PathLike, torch.Tensor], *, tokenizer=None,
                 log_fn: Optional[Callable[[dict, int], None]] = None,
                 levels_fn: Optional[Callable[[LevelConfig, int], None]] = None,
                 candidate_hook: Optional[Callable[[LevelConfig, torch.nn.Module], None]] = None,
                 offspring_format: str = 'shrunk'):
        if isinstance(settings, Mapping):
            settings = SearchSettings.from_dict(settings)
        if offspring_format not in ('shrunk', 'masked'):
            raise ValueError(f"offspring_format must be 'shrunk' or 'masked', got {offspring_format!r}")
        self.settings = settings
        self.db = database
        self.spec = database.level_spec
        self.get_tensor = dense_get_tensor
        if isinstance(data, torch.Tensor):
            data = TensorTokens(data)
        elif isinstance(data, (str, os.PathLike)):
            data = ShardTokens(data)
        if settings.samples_by_source and not getattr(data, 'by_source', False):
            if not isinstance(data, ShardTokens):
                raise ValueError(f'samples_by_source needs an MDS split of data.convert_to_mds (it records each '
                                 f"row's source file), got {type(data).__name__}; give the split or set "
                                 'samples_by_source: false')
            data = ShardTokens(data.split_dir, by_source=True)
        self.data: TokenSource = data
        self.tokenizer = tokenizer
        self.log_fn = log_fn
        self.levels_fn = levels_fn
        self.candidate_hook = candidate_hook
        self.offspring_format = offspring_format
        self.schedule = settings.schedule
        self.rank, self.world_size = torch_world()
        self.device = self._resolve_device()
        self.precision = settings.precision if settings.precision != 'auto' else (
            'amp_bf16' if self.device.type == 'cuda' else 'fp32')
        # Targets are kept in the form the fitness reads (the prepared dense side, no logits) and computed one
        # micro-batch of sequences at a time (see DenseLogitCache).
        self.cache = DenseLogitCache(directory=settings.dense_cache_dir,
                                     topk=settings.topk if settings.fitness == 'topk_kl' else None,
                                     prepared=True, compute_rows=settings.micro_batch_size)
        self._probe_targets = None  # the probe sample's dense targets, in a file when large (see probe_fitness)
        self._scratch: Optional[str] = None  # directory of spilled targets, removed when run() ends
        self._probe_memo: Optional[tuple] = None  # (config, probe fitness) of the last parent scored
        self._dense_model: Optional[torch.nn.Module] = None
        self._masked_base: Optional[torch.nn.Module] = None
        # KL-only steps assemble their candidates from shared units (False: build each whole; same values);
        # (step key, parts) of the step evaluated last
        self.share_units = True
        self._step_parts: Optional[tuple] = None
        self._loader = _TokenBatches(settings.micro_batch_size)
        self.bounds = self._bounds()
        self.start = self._start_config()
        self.start_parameters = self.spec.parameter_count(self.start)
        self.mode = self._resolve_mode()
        self.stats = {'fits': 0, 'fit_seconds': 0.0, 'trainer_init_seconds': 0.0, 'stitch_seconds': 0.0,
                      'fitness_seconds': 0.0, 'evaluations': 0, 'probe_evaluations': 0, 'probe_seconds': 0.0}
        log.info('DarwinLM search: %s mode on %d rank(s), device %s, %s offspring', self.mode, self.world_size,
                 self.device, self.offspring_format)
        if self.mode == 'fsdp' and self.device.type != 'cuda':
            log.warning('DarwinLM search: Composer shards with FSDP on CUDA only; on %s every candidate\'s fit is '
                        'data-parallel over the %d ranks instead (DDP, one full replica per rank)',
                        self.device, self.world_size)

    # -- setup -------------------------------------------------------------------------------------
    def _resolve_device(self) -> torch.device:
        want = self.settings.device
        if want == 'auto':
            want = 'cuda' if torch.cuda.is_available() else 'cpu'
        if want == 'cuda':
            if not torch.cuda.is_available():
                raise RuntimeError("device 'cuda' was asked for but CUDA is not available; use device: cpu")
            return torch.device('cuda', local_rank() % torch.cuda.device_count())
        return torch.device('cpu')

    def _bounds(self) -> LevelBounds:
        current = self.spec.current_levels
        lower = LevelConfig(attn=current['attn'], mlp=current['mlp'])
        upper = {}
        for kind in GROUPS:
            top = self.spec.max_exact_level(kind)
            if self.settings.max_level is not None:
                top = min(top, self.spec.kind_level(kind, int(self.settings.max_level)))
            upper[kind] = [max(top, lo) for lo in lower.group(kind)]
        return LevelBounds(lower, LevelConfig(**upper))

    def _start_config(self) -> LevelConfig:
        s = self.settings
        n = self.spec.num_layers
        if s.start_config is not None:
            config = LevelConfig.read_file(s.start_config)
            if config.num_layers != n:
                raise ValueError(f'{s.start_config} has {config.num_layers} layers, the database {n}')
        else:
            config = uniform(n, int(s.target_level), mlp_split=self.spec.mlp_split)
        problems = self.bounds.violations(config)
        if problems:
            raise ValueError(f'the starting configuration is outside the allowed levels: {problems[:4]}. The '
                             f'database allows levels {self.bounds.lower.to_dict()}..{self.bounds.upper.to_dict()} '
                             f'(exact-size limit per kind: attn {self.spec.max_exact_level("attn")}, mlp '
                             f'{self.spec.max_exact_level("mlp")}); lower target_level or raise max_level.')
        if float(s.extra_levels):
            extra = {kind: float(s.extra_levels) * self.spec.kind_level(kind, 1) for kind in GROUPS}
            config = spread_extra_levels(config, extra, self.bounds,
                                         make_rng(derive_seed(s.seed, 'extra_levels')))
        return config

    def fingerprint_fields(self, legacy: bool = False) -> dict:
        """What a resumed run must share with the run that wrote the state (``legacy``: as fingerprinted before
        searches could be extended, with the number of generations)."""
        start = self.settings.start_config
        return {'settings': self.settings.result_fields(legacy), 'database': self.db.manifest['fingerprint'],
                'level_spec': self.spec.to_dict(), 'data': self.data.describe(),
                'start': self.start.to_dict() if start is not None else None,
                'offspring_format': self.offspring_format}

    def _resolve_mode(self) -> str:
        if self.world_size == 1:
            return 'single'
        want = self.settings.distributed
        if want != 'auto':
            return want
        if self.device.type == 'cuda':
            free, _ = torch.cuda.mem_get_info(self.device)
            fits = self._candidate_memory_bytes() < 0.8 * free
        else:
            # total (not currently free) memory: free memory varies with whatever else runs, and a rerun after
            # a kill must pick the same mode as the first run (fsdp scores a different share of the rows)
            try:
                avail = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / max(1, self.world_size)
            except (ValueError, OSError):
                avail = float('inf')
            fits = self._candidate_memory_bytes() < 0.8 * avail
        if not fits and self._smallest_sample_rows() < self.world_size:
            # fsdp splits every sample's rows over the ranks: with fewer rows than ranks it cannot run at all.
            print(f'DarwinLM search: a candidate may not fit the memory of one rank, but a sample of '
                  f'{self._smallest_sample_rows()} sequence(s) cannot be split over {self.world_size} ranks '
                  f'(fsdp mode); evaluating offspring in parallel instead', flush=True)
            return 'offspring_parallel'
        return 'offspring_parallel' if fits else 'fsdp'

    def _smallest_sample_rows(self) -> int:
        """Sequences in the smallest sample the search draws (fitness, fine-tuning and probe samples)."""
        s = self.settings
        tokens = [t for t in (*s.fitness_tokens, *s.train_tokens, s.probe_size) if t]
        return min(math.ceil(t / s.seq_len) for t in tokens)

    # -- models ------------------------------------------------------------------------------------
    def _current_levels(self) -> dict:
        return {k: list(v) for k, v in self.spec.current_levels.items()}

    # -- the search --------------------------------------------------------------------------------
    @property
    def state_path(self) -> str:
        return os.path.join(self.settings.output_dir, STATE_FILE)

    def _load_state(self) -> SearchState:
        fp = settings_fingerprint(self.fingerprint_fields())
        state_dict = None
        if self.rank == 0:
            state = SearchState.load_or_new(self.state_path, fp, lambda: self._new_state(fp),
                                            legacy=(settings_fingerprint(self.fingerprint_fields(legacy=True)),))
            if not os.path.exists(self.state_path) and ('kind_balance' in state.extra or
                                                        'unit_protection' in state.extra):
                state.save(self.state_path)  # the chosen start took minutes: kept before generation 1
            state_dict = state.to_dict()
        # Rank 0 reads; everyone continues from its copy (no shared filesystem needed).
        state_dict = broadcast_object(state_dict)
        return SearchState.from_dict(state_dict)

    def _new_state(self, fp: str) -> SearchState:
        start, extra = self.start, {}
        s = self.settings
        if s.balance_kinds or s.protect_units:
            extra['start_before_balance'] = self.start.to_dict()
            tokens = self.balance_sample()
            fitness = None
            if s.balance_kinds:
                start, extra['kind_balance'] = self.balance_kinds(self.start, tokens)
                chosen = extra['kind_balance']['shift']  # its fitness on this sample: protection compares there
                fitness = next(c['fitness'] for c in extra['kind_balance']['candidates'] if c['shift'] == chosen)
            if s.protect_units and s.balance_top > 1:
                start, extra['unit_protection'] = self._protect_top_splits(extra['kind_balance'], tokens)
            elif s.protect_units:
                start, extra['unit_protection'] = self.protect_units(start, tokens, fitness)
        return SearchState.new(start, derive_seed(self.settings.seed, 'mutation'), fp,
                               extra={'start': start.to_dict(), 'start_parameters': self.start_parameters, **extra})

    def _check_size(self, candidate: LevelConfig, size: int, what: str) -> None:
        """A start candidate must keep the parameter count exactly (the bounds keep every level size-neutral)."""
        if self.spec.parameter_count(candidate) != size:
            raise AssertionError(f'{what} changes the size: {self.spec.parameter_count(candidate)} against {size}')

    def balance_sample(self) -> torch.Tensor:
        """The fixed sample that picks the start (``balance_kinds``, ``protect_units``): ``balance_tokens``
        tokens (default the last fitness step's) with their own seed, so the generations' samples are unchanged."""
        s = self.settings
        n_tokens = s.fitness_tokens[-1] if s.balance_tokens is None else s.balance_tokens
        return self.data.sample(self._n_seqs(n_tokens), s.seq_len, derive_seed(s.seed, 'balance'))

    def protect_units(self, config: LevelConfig, tokens: torch.Tensor,
                      fitness: Optional[float] = None) -> tuple[LevelConfig, dict]:
        """Up to ``protect_units`` rounds; each scores every one-unit protection of the current start
        (:func:`~darwinlm_foundry.search.space.unit_protection_candidates`: one unit gives back half its kind's
        mean level to the others, the size exactly kept) on ``tokens`` and keeps the fittest if it beats the
        current start; stops at the first round that finds none. ``fitness``: the current start's on ``tokens``
        when already known. Returns the start and a record of the moves.

        Like the selection's steps, the candidates are screened first: with ``fitness_tokens`` smaller than the
        sample, every candidate is scored on the sample's first that many tokens and only the best ``survivors``
        go on (the one unit worth protecting stands far apart; scoring all on the whole sample doubled the cost).
        The final comparison is on the whole sample, against the start."""
        size = self.spec.parameter_count(config)
        if fitness is None:
            fitness = self.configs_fitness([config], tokens, 'balance')[0]
        rows = tokens.shape[0] if tokens.dim() > 1 else 1
        screens = [(n, k) for n, k in zip((self._n_seqs(t) for t in self.settings.fitness_tokens),
                                          self.settings.survivors) if tokens.dim() > 1 and n < rows]
        moves, first = [], fitness
        for round_ in range(self.settings.protect_units):
            pool = []
            for kind, unit, candidate in unit_protection_candidates(config, self.bounds):
                self._check_size(candidate, size, f'protecting {kind} unit {unit}')
                pool.append((kind, unit, candidate))
            if not pool:
                break
            n_all = len(pool)
            for step, (n, keep) in enumerate(screens):
                if len(pool) <= keep:
                    continue
                # every candidate on one sample at once: its dense targets are computed once and never kept
                # in the cache between the splits and rounds (for SmolLM2 a 4,096-token sample's are 0.8 GB)
                screened = self.configs_fitness([c for _, _, c in pool], tokens[:n], f'balance_screen{step}')
                pool = [pool[i] for i in sorted(range(len(pool)), key=screened.__getitem__)[:keep]]
            scored = [(f, kind, unit, c) for f, (kind, unit, c) in
                      zip(self.configs_fitness([c for _, _, c in pool], tokens, 'balance'), pool)]
            best = min(scored, key=lambda row: row[0])
            if best[0] >= fitness:
                break
            moves.append({'round': round_ + 1, 'kind': best[1], 'layer': best[2],
                          'level': {'from': config.group(best[1])[best[2]], 'to': best[3].group(best[1])[best[2]]},
                          'fitness': best[0], 'candidates': n_all, 'finalists': len(scored)})
            fitness, config = best[0], best[3]
            print(f'DarwinLM search: unit protection round {round_ + 1}: {best[1]} unit of layer {best[2]} from '
                  f'level {moves[-1]["level"]["from"]} to {moves[-1]["level"]["to"]} (the others take its levels), '
                  f'fitness {best[0]:.4f} on {tokens.numel()} tokens, the best of {n_all}'
                  + (f' ({len(scored)} after screening)' if len(scored) < n_all else ''), flush=True)
        if not moves:
            print(f'DarwinLM search: unit protection: no one-unit move beats the start ({first:.4f})', flush=True)
        return config, {'tokens': int(tokens.numel()), 'start_fitness': first, 'fitness': fitness, 'moves': moves,
                        'screening': [{'tokens': int(tokens[:n].numel()), 'keep': keep} for n, keep in screens]}

    def kind_splits(self, config: LevelConfig) -> tuple[tuple[int, int], list]:
        """The exchange of equal parameter cost between the kinds and ``config``'s kind-balance candidates
        (``(shift, config)`` pairs, :func:`~darwinlm_foundry.search.space.kind_balance_candidates`)."""
        exchange = kind_exchange(self.spec.per_step_parameters('attn'), self.spec.per_step_parameters('mlp'))
        return exchange, kind_balance_candidates(config, self.bounds, exchange)

    def _protect_top_splits(self, record: dict, tokens: torch.Tensor) -> tuple[LevelConfig, dict]:
        """``balance_top``: protect each of the kind balance's fittest splits (its pick first, then by fitness on
        ``tokens``, ties to the smaller shift) and keep the fittest protected start, ties to the earlier. Updates
        ``record`` (``balance_kinds``'s): ``split_shift`` the balance's pick, ``shift`` the split kept,
        ``protected`` each split's protected fitness. Returns the start and the kept split's protection record."""
        splits = dict(self.kind_splits(self.start)[1])
        fitness = {row['shift']: row['fitness'] for row in record['candidates']}
        rest = sorted((k for k in fitness if k != record['shift']), key=lambda k: (fitness[k], abs(k)))
        best, finalists = None, []
        record['split_shift'], record['protected'] = record['shift'], {}
        for shift in [record['shift']] + rest[:self.settings.balance_top - 1]:
            print(f'DarwinLM search: protecting split {shift:+d} (fitness {fitness[shift]:.4f})', flush=True)
            config, protection = self.protect_units(splits[shift], tokens, fitness[shift])
            record['protected'][str(shift)] = protection['fitness']
            finalists.append((shift, config, protection))
            if best is None or protection['fitness'] < best[2]['fitness']:
                best = finalists[-1]
        if self.settings.balance_recheck_tokens:
            # the finalists again on a fresh sample: each one's protection was chosen on the first sample, which
            # so flatters them all; only a fresh one compares them fairly
            recheck = self._recheck_sample()
            again = self.configs_fitness([f[1] for f in finalists], recheck, 'balance_recheck')
            best = finalists[min(range(len(finalists)), key=again.__getitem__)]
            record['recheck'] = {'tokens': int(recheck.numel()),
                                 'fitness': {str(f[0]): v for f, v in zip(finalists, again)}}
        record['shift'] = best[0]
        print(f'DarwinLM search: split {best[0]:+d} kept, protected fitness {best[2]["fitness"]:.4f} ('
              + ', '.join(f'{k}: {v:.4f}' for k, v in record['protected'].items()) + ')'
              + (f'; re-scored on {record["recheck"]["tokens"]} fresh tokens: '
                 + ', '.join(f'{k}: {v:.4f}' for k, v in record['recheck']['fitness'].items())
                 if 'recheck' in record else ''), flush=True)
        return best[1], best[2]

    def _recheck_sample(self) -> torch.Tensor:
        """The fresh sample of ``balance_recheck_tokens`` tokens that re-scores the start's finalists."""
        s = self.settings
        return self.data.sample(self._n_seqs(s.balance_recheck_tokens), s.seq_len,
                                derive_seed(s.seed, 'balance_recheck'))

    def balance_kinds(self, config: LevelConfig, tokens: Optional[torch.Tensor] = None) -> tuple[LevelConfig, dict]:
        """The fittest of ``config``'s kind-balance candidates (``balance_kinds``) and a record of their scores.

        Every candidate moves whole exchanges of equal parameter cost between attention and MLP levels
        (:func:`~darwinlm_foundry.search.space.kind_balance_candidates`); all are scored as stitched on one fixed
        sample (``tokens``, default :meth:`balance_sample`). Runs
        on the rank that creates the state; the others receive the state it makes.
        """
        exchange, candidates = self.kind_splits(config)
        size = self.spec.parameter_count(config)
        if tokens is None:
            tokens = self.balance_sample()
        for shift, candidate in candidates:
            self._check_size(candidate, size, f'kind-balance shift {shift}')
        scores = self.configs_fitness([candidate for _, candidate in candidates], tokens, 'balance')
        rows = [{'shift': shift, 'attn_levels': sum(candidate.attn), 'mlp_levels': sum(candidate.mlp),
                 'fitness': fitness} for (shift, candidate), fitness in zip(candidates, scores)]
        order = sorted(range(len(rows)), key=lambda i: (rows[i]['fitness'], abs(rows[i]['shift'])))
        best = order[0]
        record = {'exchange': {'attn_levels': exchange[0], 'mlp_levels': exchange[1]}, 'tokens': int(tokens.numel()),
                  'candidates': rows}
        if self.settings.balance_recheck_tokens and self.settings.balance_top == 1:
            # the best few again on a larger fresh sample, as the selection's last step does: on one fitness
            # step's tokens the split is the noisiest choice of the whole start (with balance_top > 1 the
            # protected finalists are re-scored instead, _protect_top_splits)
            recheck = self._recheck_sample()
            top = order[:BALANCE_RECHECK_TOP]
            again = dict(zip(top, self.configs_fitness([candidates[i][1] for i in top], recheck, 'balance_recheck')))
            best = min(top, key=lambda i: (again[i], abs(rows[i]['shift'])))
            record['recheck'] = {'tokens': int(recheck.numel()),
                                 'fitness': {str(rows[i]['shift']): again[i] for i in top}}
        record['shift'] = rows[best]['shift']
        start_row = next(r for r in rows if r['shift'] == 0)
        print(f'DarwinLM search: kind balance over {len(rows)} starts of {size:,} parameters ({exchange[0]} '
              f'attention levels = {exchange[1]} MLP levels): shift {rows[best]["shift"]:+d} (attention level sum '
              f'{rows[best]["attn_levels"]}, MLP {rows[best]["mlp_levels"]}), fitness {rows[best]["fitness"]:.4f} '
              f'against {start_row["fitness"]:.4f} at the start, on {tokens.numel()} tokens'
              + (f'; the best {len(record["recheck"]["fitness"])} re-scored on {record["recheck"]["tokens"]} tokens: '
                 + ', '.join(f'{k}: {v:.4f}' for k, v in record['recheck']['fitness'].items())
                 if 'recheck' in record else ''), flush=True)
        return candidates[best][1], record

    def _check_probe(self, state: SearchState) -> None:
        """Record the probe's size in the state; refuse to resume a state whose probe had another size (its
        probe fitness values would not be comparable with the new ones)."""
        size = self.settings.probe_size
        recorded = state.extra.get('probe')
        if not size:
            return
        if recorded is not None and int(recorded.get('tokens', size)) != size:
            from darwinlm_foundry.search.state import SearchStateError
            raise SearchStateError(f'{self.state_path} scores the parent on a probe sample of {recorded["tokens"]} '
                                   f'tokens, these settings ask for {size}: set probe_tokens: '
                                   f'{recorded["tokens"]} to resume it (or 0 to stop probing), or delete the '
                                   f'state to start afresh')
        if recorded is None:
            state.extra['probe'] = {'tokens': size, 'seed': derive_seed(self.settings.seed, 'probe')}

    def run(self, on_generation: Optional[Callable[[SearchState, GenerationResult], None]] = None) -> SearchResult:
        """Run or resume the search to ``settings.generations``; write the winner; return it (every rank).

        With ``generations: 0`` nothing is searched: the start configuration is the winner (its probe fitness,
        when a probe is set, is its fitness)."""
        s = self.settings
        state = self._load_state()
        start_gen = state.generation
        self._check_probe(state)
        bar = None
        if s.progress_bar and self.rank == 0 and s.generations > start_gen:
            from tqdm.auto import tqdm
            bar = tqdm(total=s.generations, initial=start_gen, desc=f'DarwinLM search ({self.mode})',
                       unit='gen', dynamic_ncols=True)
        log.info('DarwinLM search: generation %d of %d, %s mode, %d rank(s)', start_gen, s.generations,
                 self.mode, self.world_size)

        def make_evaluate(g):
            # each step computes its dense targets when it starts and drops them when it ends (evaluate), and
            # its candidates' shared units when it ends (a step is evaluated in one call here)
            def evaluate(candidates, k):
                try:
                    return self.evaluate(candidates, g, k)
                finally:
                    self._step_parts = None
            return evaluate

        def hook(st: SearchState, result: GenerationResult):
            rec = st.history[-1]
            evals = sum(len(step.candidates) for step in result.steps)
            metrics = {'search/fitness': result.fitness, 'search/generation': st.generation,
                       'search/params': self.spec.parameter_count(st.parent),
                       'search/sec_per_offspring': rec['seconds'] / max(1, evals),
                       'search/parent_kept': int(result.parent_won)}
            if rec.get('probe_fitness') is not None:
                metrics['search/probe_fitness'] = rec['probe_fitness']
            if self.log_fn is not None:
                self.log_fn(metrics, st.generation)
            if self.levels_fn is not None:
                self.levels_fn(st.parent, st.generation)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(fitness=f'{result.fitness:.4g}', **(
                    {'probe': f'{rec["probe_fitness"]:.4g}'} if rec.get('probe_fitness') is not None else {}))
            self.cache.clear_memory()  # this generation's samples are never needed again
            if on_generation is not None:
                on_generation(st, result)

        try:
            if start_gen == 0:
                # generation 0 = the start configuration; its probe fitness is where the comparable curve begins
                # (and the fitness of a 0-generation search)
                metrics = {'search/generation': 0, 'search/params': self.spec.parameter_count(state.parent)}
                if 'kind_balance' in state.extra:
                    metrics['search/kind_balance_shift'] = state.extra['kind_balance']['shift']
                if 'unit_protection' in state.extra:
                    metrics['search/protected_units'] = len(state.extra['unit_protection']['moves'])
                if s.probe_size:
                    if state.extra.get('start_probe_fitness') is None:
                        state.extra['start_probe_fitness'] = self.probe_fitness(state.parent)
                    metrics['search/probe_fitness'] = state.extra['start_probe_fitness']
                if self.log_fn is not None:
                    self.log_fn(metrics, 0)
                if self.levels_fn is not None:
                    self.levels_fn(state.parent, 0)
            run_search(state, s.generations, make_evaluate, self.bounds, self.schedule,
                       self.state_path if self.rank == 0 else None, on_generation=hook,
                       score_parent=self.probe_fitness if s.probe_size else None, max_switches=s.max_switches)
        finally:
            if bar is not None:
                bar.close()
            self._dense_model = None
            self._drop_scratch()
            self._probe_targets = None  # in memory when small (see probe_fitness)
            self._release_file_maps()
        start_probe = state.extra.get('start_probe_fitness')
        rule = s.winner_rule
        picked = len(state.history)
        if rule == 'best_probe':
            best = best_probe_generation(start_probe, state.history)
            if best is None:  # a state written before the probe existed: its last parent, said so
                rule = 'last'
            else:
                picked = best
        if picked == len(state.history):
            winner, fitness = state.parent, state.parent_fitness
        elif picked == 0:
            winner, fitness = LevelConfig.from_dict(state.extra['start']), None
        else:
            winner, fitness = LevelConfig.from_dict(state.history[picked - 1]['winner']), \
                state.history[picked - 1]['fitness']
        probe = state.history[picked - 1].get('probe_fitness') if picked else start_probe
        if fitness is None and not picked:
            fitness = probe  # the start configuration: its probe fitness (None without a probe)
        if winner != state.parent:  # (a parent kept through the last generations ties with itself: no news)
            last = state.history[-1].get('probe_fitness')
            print(f'DarwinLM search: winner: {rule}: the parent after generation {picked} of {len(state.history)}'
                  f'{" (the start)" if not picked else ""}, probe fitness {probe:.4f} against the last parent\'s '
                  f'{"n/a" if last is None else f"{last:.4f}"}', flush=True)
        result = SearchResult(winner=winner, fitness=fitness,
                              parameters=self.spec.parameter_count(winner),
                              dense_parameters=self.spec.dense_parameter_count(), generations=state.generation,
                              history=state.history, mode=self.mode, probe_fitness=probe,
                              start_probe_fitness=start_probe, winner_generation=picked, winner_rule=rule)
        self.write_outputs(result, state)
        return result

    def write_outputs(self, result: SearchResult, state: SearchState) -> None:
        """``winner.json`` (levels, sizes, fitness history, settings) and ``winner.txt`` (research format)."""
        out = self.settings.output_dir
        result.json_path = os.path.join(out, WINNER_JSON)
        result.text_path = os.path.join(out, WINNER_TEXT)
        if self.rank != 0:
            return
        spec = self.spec
        winner = result.winner
        keys = ('generation', 'fitness', 'probe_fitness', 'parent_won', 'winner', 'step_fitnesses', 'num_offspring',
                'seconds')
        payload = {
            **result.to_dict(),
            'start': state.extra.get('start'),
            **{key: state.extra[key] for key in ('kind_balance', 'unit_protection', 'start_before_balance')
               if key in state.extra},
            'heads': [spec.keep('attn', lvl) for lvl in winner.attn],
            'mlp_columns': [spec.keep('mlp', lvl) for lvl in winner.mlp],
            'level_steps': spec.steps,
            'num_levels': spec.num_levels,
            'mlp_level_split': spec.mlp_split,
            'probe_tokens': self.settings.probe_size,
            # probe_fitness only in records that have it (states written before the probe existed lack it)
            'history': [{k: h[k] for k in keys if k in h} for h in state.history],
            'fingerprint': state.fingerprint,
            'settings': self.settings.to_dict(),
            'database': self.db.db_dir,
        }
        atomic_write_text(result.json_path, json.dumps(payload, indent=1))
        atomic_write_text(result.text_path, winner.to_text())
