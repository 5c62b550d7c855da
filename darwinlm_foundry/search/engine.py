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

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from darwinlm_foundry.search.fitness import DenseLogitCache, next_token_labels, token_nll
from darwinlm_foundry.search.selection import GenerationResult
from darwinlm_foundry.search.settings import SearchSettings
from darwinlm_foundry.search.space import GROUPS, LevelBounds, LevelConfig, make_rng, spread_extra_levels, uniform
from darwinlm_foundry.search.state import SearchState, run_search, settings_fingerprint
from darwinlm_foundry.search.tokens import ShardTokens, TensorTokens, TokenSource, derive_seed
from darwinlm_foundry.utils.dist import broadcast_object, composer_rank_local, local_rank, sum_over_ranks, torch_world
from darwinlm_foundry.utils.io import atomic_write_text
from darwinlm_foundry.utils.logging import quiet
from darwinlm_foundry.utils.params import count_parameters

__all__ = ['SearchResult', 'EvolutionarySearch', 'STATE_FILE', 'WINNER_JSON', 'WINNER_TEXT']

log = logging.getLogger(__name__)

STATE_FILE = 'search_state.json'
WINNER_JSON = 'winner.json'
WINNER_TEXT = 'winner.txt'



# --------------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------------
def _quiet_composer():
    """Keep Composer / foundry chatter of the many short fits out of the log."""
    return quiet('composer', 'llmfoundry', 'streaming')


_ENV_REPORT: dict = {}


@contextlib.contextmanager
def _cached_env_report():
    """Trainer construction asks for Composer's environment report (version, commit hash: a scan of the
    installed files, ~0.1-0.2 s) every time; it cannot change between fits, so compute it once."""
    import composer.trainer.trainer as trainer_module

    original = getattr(trainer_module, 'get_composer_env_dict', None)
    if original is None:
        yield
        return
    if not _ENV_REPORT:
        _ENV_REPORT.update(original())
    trainer_module.get_composer_env_dict = lambda: dict(_ENV_REPORT)
    try:
        yield
    finally:
        trainer_module.get_composer_env_dict = original


class _TokenBatches:
    """Re-iterable LM batches over a token tensor; one object is reused by every fit (tokens swapped per step)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.tokens: Optional[torch.Tensor] = None

    def set_tokens(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return math.ceil(len(self.tokens) / self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.tokens), self.batch_size):
            ids = self.tokens[i:i + self.batch_size]
            yield {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids.clone()}


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

    def fitness_history(self) -> list:
        """The winner's last-step fitness per generation (each on that generation's fresh sample)."""
        return [h['fitness'] for h in self.history]

    def probe_fitness_history(self) -> list:
        """The parent's fitness on the fixed probe sample per generation (None where not recorded)."""
        return [h.get('probe_fitness') for h in self.history]

    def to_dict(self) -> dict:
        """``fitness``: the winner's last-step fitness (with 0 generations: the start's probe fitness, or
        None); ``probe_fitness``: the winner's fitness on the fixed probe sample (None without a probe)."""
        return {'levels': self.winner.to_dict(), 'fitness': self.fitness, 'parameters': self.parameters,
                'dense_parameters': self.dense_parameters, 'generations': self.generations,
                'fitness_history': self.fitness_history(), 'probe_fitness': self.probe_fitness,
                'start_probe_fitness': self.start_probe_fitness,
                'probe_fitness_history': self.probe_fitness_history(), 'mode': self.mode}


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------
class EvolutionarySearch:
    """Runs (or resumes) the search over ``database`` and writes the winner. Same object on every rank.

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
        self._probe_targets = None  # the probe sample's dense targets, spilled to a file (see probe_fitness)
        self._scratch: Optional[str] = None  # directory of spilled targets, removed when run() ends
        self._probe_memo: Optional[tuple] = None  # (config, probe fitness) of the last parent scored
        self._dense_model: Optional[torch.nn.Module] = None
        self._masked_base: Optional[torch.nn.Module] = None
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
                top = min(top, int(self.settings.max_level))
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
            config = uniform(n, int(s.target_level))
        problems = self.bounds.violations(config)
        if problems:
            raise ValueError(f'the starting configuration is outside the allowed levels: {problems[:4]}. The '
                             f'database allows levels {self.bounds.lower.to_dict()}..{self.bounds.upper.to_dict()} '
                             f'(exact-size limit per kind: attn {self.spec.max_exact_level("attn")}, mlp '
                             f'{self.spec.max_exact_level("mlp")}); lower target_level or raise max_level.')
        if float(s.extra_levels):
            config = spread_extra_levels(config, float(s.extra_levels), self.bounds,
                                         make_rng(derive_seed(s.seed, 'extra_levels')))
        return config

    def fingerprint_fields(self) -> dict:
        """What a resumed run must share with the run that wrote the state."""
        start = self.settings.start_config
        return {'settings': self.settings.result_fields(), 'database': self.db.manifest['fingerprint'],
                'level_spec': self.spec.to_dict(), 'data': self.data.describe(),
                'start': self.start.to_dict() if start is not None else None,
                'offspring_format': self.offspring_format}

    def _candidate_memory_bytes(self) -> int:
        """Rough bytes one candidate's fit needs: fp32 weights, grads, Adam moments, activations, logits."""
        s = self.settings
        params = self.start_parameters
        hidden, vocab = self.spec.hidden_size, self.spec.vocab_size
        acts = s.micro_batch_size * s.seq_len * (self.spec.num_layers * hidden * 34 + vocab * 8)
        return 16 * params + acts

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
            try:
                avail = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / max(1, self.world_size)
            except (ValueError, OSError):
                avail = float('inf')
            fits = self._candidate_memory_bytes() < 0.8 * avail
        return 'offspring_parallel' if fits else 'fsdp'

    # -- models ------------------------------------------------------------------------------------
    def _current_levels(self) -> dict:
        return {k: list(v) for k, v in self.spec.current_levels.items()}

    def _dense(self) -> torch.nn.Module:
        """The database's source model (stitched at its current levels = the model itself), on the device."""
        if self._dense_model is None:
            self._dense_model = self.db.stitch(self._current_levels(), self.get_tensor).to(self.device).eval()
            self._release_file_maps()
        return self._dense_model

    def _release_dense(self) -> None:
        if not self.settings.keep_dense_resident:
            self._dense_model = None
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()
        self._release_file_maps()
        _trim_heap()

    def _release_file_maps(self) -> None:
        """Close the memory-mapped safetensors files of the dense checkpoint and of the database.

        The tensor getter and the database keep their files open (mapped) after the first read; every page a
        stitch ever touched then stays in this process's resident set (the whole checkpoint, and every level
        of the database a candidate ever used: up to 0.54 + 0.59 GB for SmolLM2-135M). Reopening costs a file
        open per stitch. (Private attributes of the getter / database, read defensively: a getter without them is an
        in-memory one.)"""
        for owner in (self.get_tensor, self.db):
            handles = getattr(owner, '_handles', None)
            if isinstance(handles, dict):
                handles.clear()

    def build_candidate(self, config: LevelConfig) -> torch.nn.Module:
        """The candidate as a model on the CPU: stitched and shrunk (or, for benchmarks, masked)."""
        t0 = time.perf_counter()
        if self.offspring_format == 'shrunk':
            model = self.db.stitch(config, self.get_tensor)
            self._release_file_maps()
            count = count_parameters(model)
            expected = self.spec.parameter_count(config)
            if count != expected:
                raise RuntimeError(f'stitched candidate has {count} parameters, the level spec says {expected}; '
                                   f'the database and the model disagree')
        else:
            from darwinlm_foundry.structure.shrinking import mask_model
            from darwinlm_foundry.structure.units import Unit
            if self._masked_base is None:
                self._masked_base = self.db.stitch(self._current_levels(), self.get_tensor)
            kept, weights = {}, {}
            for kind in GROUPS:
                for layer, level in enumerate(config.group(kind)):
                    unit = Unit(layer, kind)
                    if level == self.db.current_level(unit):
                        continue
                    kept[unit] = self.db.kept(unit, level).tolist()
                    if kept[unit]:
                        weights[unit] = self.db.weight(unit, level)
            model = mask_model(self._masked_base, kept, weights)
        self.stats['stitch_seconds'] += time.perf_counter() - t0
        if self.candidate_hook is not None:
            self.candidate_hook(config, model)
        return model

    # -- samples -----------------------------------------------------------------------------------
    def _n_seqs(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.settings.seq_len))

    def fitness_sample(self, generation: int, step: int) -> torch.Tensor:
        k_tokens = self.schedule.fitness_tokens[step]
        return self.data.sample(self._n_seqs(k_tokens), self.settings.seq_len,
                                derive_seed(self.settings.seed, 'fitness', generation, step))

    def train_sample(self, generation: int, step: int) -> Optional[torch.Tensor]:
        t_tokens = self.schedule.train_tokens[step]
        if not t_tokens:
            return None
        return self.data.sample(self._n_seqs(t_tokens), self.settings.seq_len,
                                derive_seed(self.settings.seed, 'train', generation, step))

    def _rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's rows in fsdp mode (every rank scores / trains its share), all rows otherwise.

        fsdp mode uses the largest multiple of W rows so that every rank holds as many rows as the others:
        each forward / step is a collective there, and a rank with one batch more would wait forever.
        """
        if self.mode != 'fsdp':
            return tokens
        usable = len(tokens) - len(tokens) % self.world_size
        if usable == 0:
            raise ValueError(f'fsdp mode splits every sample over {self.world_size} ranks, but a sample has only '
                             f'{len(tokens)} rows of seq_len {self.settings.seq_len}: raise fitness_tokens / '
                             'train_tokens to at least world_size x seq_len')
        return tokens[:usable][self.rank::self.world_size]

    # -- dense targets -----------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == 'amp_bf16' and self.device.type == 'cuda':
            return torch.autocast('cuda', dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _logits(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        outs = []
        mb = self.settings.micro_batch_size
        with self._autocast():
            for i in range(0, len(tokens), mb):
                outs.append(model(input_ids=tokens[i:i + mb].to(self.device)).logits.float())
        return torch.cat(outs)

    def _fitness_key(self, generation: int, step: int) -> tuple:
        key = ('fitness', self.settings.seed, generation, step)
        # fsdp ranks hold different rows of the sample under one key: keep a shared cache directory consistent
        return key + (self.rank, self.world_size) if self.mode == 'fsdp' else key

    def dense_targets(self, key, tokens: torch.Tensor):
        """The prepared dense targets of sample ``key`` (computed once, a micro-batch at a time)."""
        return self.cache.get_or_compute(key, tokens, lambda t: self._logits(self._dense(), t))

    def prefill_dense(self, generation: int) -> None:
        """Dense targets of every step of ``generation``, with one dense-model load, then release it.

        (The search itself computes each step's targets when the step starts and drops them when it ends, so
        only one step's targets are ever in memory; this is for benchmarks that time evaluations alone.)"""
        if self.settings.fitness == 'ppl':
            return
        for k in range(self.schedule.num_steps):
            self.dense_targets(self._fitness_key(generation, k), self._rows(self.fitness_sample(generation, k)))
        self._release_dense()

    # -- fitness -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _fitness_sums(self, model: torch.nn.Module, tokens: torch.Tensor, targets) -> tuple[float, int]:
        """(sum of per-token fitness terms, tokens counted) of ``model`` on ``tokens`` (this rank's rows)."""
        mb = self.settings.micro_batch_size
        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        with self._autocast():
            for i in range(0, len(tokens), mb):
                ids = tokens[i:i + mb].to(self.device)
                logits = model(input_ids=ids).logits.float()
                if self.settings.fitness == 'ppl':
                    labels = next_token_labels(ids)
                    total += float(token_nll(logits, labels, reduction='sum'))
                    count += int((labels != -100).sum())
                else:
                    part = targets.rows(i, i + mb)
                    total += float(part.kl(logits, reduction='sum'))
                    count += ids.numel()
        model.train(was_training)
        return total, count

    @staticmethod
    def _finish(total: float, count: int, metric: str) -> float:
        mean = total / count
        return math.exp(mean) if metric == 'ppl' else mean

    # -- fine-tuning -------------------------------------------------------------------------------
    def _composer_device(self):
        if self.device.type == 'cuda':
            from composer.devices import DeviceGPU
            return DeviceGPU(device_id=self.device.index)
        return 'cpu'

    def fit(self, model: torch.nn.Module, tokens: torch.Tensor, seed: int):
        """Fine-tune ``model`` in place with a short Composer ``Trainer.fit`` on ``tokens`` (lr from settings).

        Returns the model to score (in fsdp mode the Trainer's wrapped Composer model, see
        :meth:`_fitness_sums_fsdp`).
        Only the optimizer and the Trainer are new per fit; the batch iterable and tokenizer are reused.
        """
        s = self.settings
        with _quiet_composer():
            from composer.models import HuggingFaceModel
            from composer.optim import DecoupledAdamW

            from darwinlm_foundry.utils.composer import transient_trainer

            if s.activation_checkpointing and getattr(model, 'supports_gradient_checkpointing', False):
                # recompute each layer's activations in the backward pass instead of keeping them (eager
                # attention keeps its probabilities: ~1.4 GB for SmolLM2 at 4 x 512 tokens); same values
                model.config.use_cache = False
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
            per_rank_batch = s.train_batch_size if self.mode != 'fsdp' else max(1, s.train_batch_size // self.world_size)
            self._loader.batch_size = per_rank_batch
            self._loader.set_tokens(tokens)
            steps = len(self._loader)
            t0 = time.perf_counter()
            ctx = composer_rank_local() if self.mode == 'offspring_parallel' else contextlib.nullcontext()
            with ctx, _cached_env_report():
                cmodel = HuggingFaceModel(model, tokenizer=self.tokenizer, use_logits=True, metrics=[],
                                          shift_labels=True)
                optimizer = DecoupledAdamW(cmodel.parameters(), lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
                                           weight_decay=0.0)
                kwargs = {}
                if self.mode == 'fsdp' and self.device.type == 'cuda':
                    # (on CPU Composer wraps the model in DDP by itself: the world is W ranks here)
                    kwargs['parallelism_config'] = {'fsdp': {'sharding_strategy': 'FULL_SHARD',
                                                             'mixed_precision': 'DEFAULT',
                                                             'use_orig_params': True}}
                with transient_trainer(model=cmodel, train_dataloader=self._loader, max_duration=f'{steps}ba',
                                       optimizers=optimizer, device=self._composer_device(), precision=self.precision,
                                       device_train_microbatch_size=min(s.micro_batch_size, per_rank_batch),
                                       seed=seed, progress_bar=False, log_to_console=False, loggers=[],
                                       callbacks=[_drop_outputs()],
                                       save_folder=None, train_subset_num_batches=-1, **kwargs) as trainer:
                    t1 = time.perf_counter()
                    trainer.fit()
                    optimizer.state.clear()  # Adam moments and gradients are not needed to score the model
                    model.zero_grad(set_to_none=True)
            self.stats['trainer_init_seconds'] += t1 - t0
            self.stats['fit_seconds'] += time.perf_counter() - t0
            self.stats['fits'] += 1
            return trainer.state.model.model if self.mode != 'fsdp' else trainer.state.model

    # -- evaluation of one selection step ----------------------------------------------------------
    def evaluate(self, candidates: Sequence[LevelConfig], generation: int, step: int) -> list[float]:
        """Fine-tune and score ``candidates`` for step ``step`` of ``generation``; identical list on every rank."""
        s = self.settings
        fit_tokens = self.fitness_sample(generation, step)
        train_tokens = self.train_sample(generation, step)
        targets = None
        key = self._fitness_key(generation, step)
        if s.fitness != 'ppl':
            if train_tokens is not None and self.cache.directory is None:
                # fine-tuning steps: the targets wait in a file while each candidate trains (the fit's own
                # peak is the search's largest), then are read back a micro-batch at a time
                targets = self._spill_dense_targets(self._rows(fit_tokens), f'step_{generation}_{step}')
            else:
                targets = self.dense_targets(key, self._rows(fit_tokens))
                self._release_dense()
        fit_seed = derive_seed(s.seed, 'fit', generation, step)
        n = len(candidates)
        if self.mode == 'offspring_parallel':
            mine = list(range(self.rank, n, self.world_size))
        else:
            mine = list(range(n))
        sums = torch.zeros(n, dtype=torch.float64)
        counts = torch.zeros(n, dtype=torch.float64)
        for i in mine:
            model = self.build_candidate(candidates[i])
            scored = model.to(self.device)
            if train_tokens is not None:
                scored = self.fit(model, self._rows(train_tokens), fit_seed)
            t0 = time.perf_counter()
            if self.mode == 'fsdp':
                total, count = self._fitness_sums_fsdp(scored, self._rows(fit_tokens), targets)
            else:
                total, count = self._fitness_sums(scored, fit_tokens, targets)
            self.stats['fitness_seconds'] += time.perf_counter() - t0
            sums[i], counts[i] = total, count
            self.stats['evaluations'] += 1
            del model, scored
            if train_tokens is not None:
                gc.collect()  # the fit's Trainer is a reference cycle that still holds the candidate
            _trim_heap()
        # this step's sample is never scored again (keys name the generation and step)
        self._drop_spilled(targets)
        del targets
        self.cache.forget(key)
        # fsdp: every rank scored its rows of every candidate; otherwise exactly one rank scored each
        # candidate and the others contribute exact zeros. Either way the sums over ranks are the totals.
        both = sum_over_ranks(torch.cat([sums, counts]))
        sums, counts = both[:n], both[n:]
        return [self._finish(float(sums[i]), int(counts[i]), s.fitness) for i in range(n)]

    def _fitness_sums_fsdp(self, composer_model, tokens: torch.Tensor, targets) -> tuple[float, int]:
        """Fitness parts through the wrapped Composer model (FSDP or DDP): every rank runs as many forwards
        as the others (``_rows`` gives every rank the same row count), since each forward is a collective."""
        mb = self.settings.micro_batch_size
        total, count = 0.0, 0
        composer_model.eval()
        with torch.no_grad(), self._autocast():
            for i in range(0, len(tokens), mb):
                ids = tokens[i:i + mb].to(self.device)
                logits = composer_model({'input_ids': ids, 'attention_mask': torch.ones_like(ids)}).logits.float()
                if self.settings.fitness == 'ppl':
                    labels = next_token_labels(ids)
                    total += float(token_nll(logits, labels, reduction='sum'))
                    count += int((labels != -100).sum())
                else:
                    total += float(targets.rows(i, i + mb).kl(logits, reduction='sum'))
                    count += ids.numel()
        return total, count

    def config_fitness(self, config: LevelConfig, tokens: torch.Tensor, key=None, train_tokens=None,
                       seed: int = 0) -> float:
        """Fitness of one configuration on ``tokens`` (optionally after a fit on ``train_tokens``); one rank."""
        targets = None
        if self.settings.fitness != 'ppl':
            targets = self.dense_targets(key or ('eval', _digest(tokens)), tokens)
            self._release_dense()
        model = self.build_candidate(config).to(self.device)
        if train_tokens is not None:
            model = self.fit(model, train_tokens, seed)
        total, count = self._fitness_sums(model, tokens, targets)
        return self._finish(total, count, self.settings.fitness)

    # -- the probe -----------------------------------------------------------------------------------
    def probe_sample(self) -> Optional[torch.Tensor]:
        """The fixed probe sample (same tokens every generation; None when ``probe_tokens`` is 0)."""
        size = self.settings.probe_size
        if not size:
            return None
        return self.data.sample(self._n_seqs(size), self.settings.seq_len,
                                derive_seed(self.settings.seed, 'probe'))

    def _spill_dense_targets(self, tokens: torch.Tensor, name: str):
        """Dense targets of ``tokens`` computed one micro-batch at a time, each block written to a scratch file
        as it comes (:class:`~darwinlm_foundry.search.fitness.SpilledTargets`: read back a micro-batch at a time,
        never memory-mapped), so they occupy no memory between reads. The same values as
        :meth:`dense_targets`."""
        from darwinlm_foundry.search.fitness import SpilledTargets

        if self._scratch is None:
            out = self.settings.dense_cache_dir or self.settings.output_dir
            os.makedirs(out, exist_ok=True)
            self._scratch = tempfile.mkdtemp(prefix='.darwinlm_targets_', dir=out)
        mb = self.settings.micro_batch_size
        converter = DenseLogitCache(topk=self.cache.topk, prepared=True)  # converts, stores nothing
        blocks = (converter.convert(self._logits(self._dense(), tokens[i:i + mb])) for i in range(0, len(tokens), mb))
        try:
            return SpilledTargets.write_blocks(blocks, os.path.join(self._scratch, name))
        finally:
            self._release_dense()

    def _drop_spilled(self, targets) -> None:
        """Delete the files of spilled targets (no-op for in-memory ones), and the scratch directory once empty."""
        for name in getattr(targets, 'fields', ()):
            with contextlib.suppress(OSError):
                os.remove(f'{targets.stem}.{name}.bin')
        if self._scratch is not None and self._probe_targets is None and not os.listdir(self._scratch):
            self._drop_scratch()

    def _drop_scratch(self) -> None:
        self._probe_targets = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def probe_fitness(self, config: LevelConfig) -> Optional[float]:
        """Fitness of ``config`` as stitched (no fine-tuning) on the fixed probe sample; identical on every
        rank; None without a probe. Deterministic: the same configuration always gets the same value, and
        no random state of the search is used."""
        if not self.settings.probe_size:
            return None
        if self._probe_memo is not None and self._probe_memo[0] == config:
            return self._probe_memo[1]
        t0 = time.perf_counter()
        sums = torch.zeros(2, dtype=torch.float64)
        # offspring_parallel: rank 0 scores, the others add zeros; fsdp: every rank scores its rows
        if self.mode == 'fsdp' or self.rank == 0:
            tokens = self._rows(self.probe_sample())
            targets = None
            if self.settings.fitness != 'ppl':
                # needed once per generation: kept in a file, not in memory (for SmolLM2's 49152-token
                # vocabulary 0.8 GB at 4096 tokens, as much as the largest selection step's targets)
                if self._probe_targets is None:
                    self._probe_targets = self._spill_dense_targets(tokens, 'probe')
                targets = self._probe_targets
            model = self.build_candidate(config).to(self.device)
            sums[0], sums[1] = self._fitness_sums(model, tokens, targets)
            del model
            _trim_heap()
        sums = sum_over_ranks(sums)
        value = self._finish(float(sums[0]), int(sums[1]), self.settings.fitness)
        self._probe_memo = (config, value)
        self.stats['probe_evaluations'] += 1
        self.stats['probe_seconds'] += time.perf_counter() - t0
        return value

    # -- the search --------------------------------------------------------------------------------
    @property
    def state_path(self) -> str:
        return os.path.join(self.settings.output_dir, STATE_FILE)

    def _load_state(self) -> SearchState:
        fp = settings_fingerprint(self.fingerprint_fields())
        state_dict = None
        if self.rank == 0:
            state = SearchState.load_or_new(self.state_path, fp, lambda: SearchState.new(
                self.start, derive_seed(self.settings.seed, 'mutation'), fp,
                extra={'start': self.start.to_dict(), 'start_parameters': self.start_parameters}))
            state_dict = state.to_dict()
        # Rank 0 reads; everyone continues from its copy (no shared filesystem needed).
        state_dict = broadcast_object(state_dict)
        return SearchState.from_dict(state_dict)

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
            # each step computes its dense targets when it starts and drops them when it ends (evaluate)
            return lambda candidates, k: self.evaluate(candidates, g, k)

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
                       score_parent=self.probe_fitness if s.probe_size else None)
        finally:
            if bar is not None:
                bar.close()
            self._dense_model = None
            self._drop_scratch()
            self._release_file_maps()
        probe = state.history[-1].get('probe_fitness') if state.history else state.extra.get('start_probe_fitness')
        fitness = state.parent_fitness
        if fitness is None and not state.history:
            fitness = probe  # no generation ran: the start configuration's probe fitness (None without a probe)
        result = SearchResult(winner=state.parent, fitness=fitness,
                              parameters=self.spec.parameter_count(state.parent),
                              dense_parameters=self.spec.dense_parameter_count(), generations=state.generation,
                              history=state.history, mode=self.mode, probe_fitness=probe,
                              start_probe_fitness=state.extra.get('start_probe_fitness'))
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
            'heads': [spec.keep('attn', lvl) for lvl in winner.attn],
            'mlp_columns': [spec.keep('mlp', lvl) for lvl in winner.mlp],
            'level_steps': spec.steps,
            'num_levels': spec.num_levels,
            'probe_tokens': self.settings.probe_size,
            # probe_fitness only in records that have it (states written before the probe existed lack it)
            'history': [{k: h[k] for k in keys if k in h} for h in state.history],
            'fingerprint': state.fingerprint,
            'settings': self.settings.to_dict(),
            'database': self.db.db_dir,
        }
        atomic_write_text(result.json_path, json.dumps(payload, indent=1))
        atomic_write_text(result.text_path, winner.to_text())


def _digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


_LIBC = None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    The many mid-sized tensors of a forward / fine-tuning pass (below glibc's mmap threshold, which rises to
    32 MB after large frees) come from the heap; freed, they stay in the process (fragmented) and every
    candidate's fit raised the resident set further. Trimming after each candidate keeps it at one fit's worth.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL('libc.so.6')
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_DROP_OUTPUTS = None


def _drop_outputs():
    """A Composer callback for the fits' memory: lets go of the model outputs before the backward pass, and
    gives the heap freed by each batch back to the OS (:func:`_trim_heap`).

    Composer keeps ``state.outputs`` (the logits: 4 x 512 x 49152 fp32 = 0.4 GB for SmolLM2) until the next
    batch, for train metrics; the fits have none and the loss is already computed, and autograd does not
    need the logits themselves (the loss keeps its log-softmax), so they are freed before the backward pass
    peaks. Changes no value."""
    global _DROP_OUTPUTS
    if _DROP_OUTPUTS is None:
        from composer.core import Callback

        class DropOutputs(Callback):

            def before_backward(self, state, logger):
                if not state.train_metrics:
                    state.outputs = None

            def batch_end(self, state, logger):
                _trim_heap()

        _DROP_OUTPUTS = DropOutputs
    return _DROP_OUTPUTS()
