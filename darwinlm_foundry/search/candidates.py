"""Candidate making and scoring for the evolutionary search: stitch a level configuration from the database,
shrink it, fine-tune it briefly with Composer, and score it against the dense model on a seeded sample.

:class:`CandidateScoring` holds this per-offspring work; :class:`~darwinlm_foundry.search.engine.EvolutionarySearch`
mixes it in and keeps the generation loop.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import math
import os
import shutil
import time
from typing import Optional, Sequence

import torch

from darwinlm_foundry.search.fitness import DenseLogitCache, score_tokens
from darwinlm_foundry.search.space import GROUPS, LevelConfig
from darwinlm_foundry.search.tokens import derive_seed
from darwinlm_foundry.utils.dist import composer_rank_local, sum_over_ranks
from darwinlm_foundry.utils.io import process_scratch_dir
from darwinlm_foundry.utils.logging import quiet
from darwinlm_foundry.utils.memory import trim_heap
from darwinlm_foundry.utils.params import count_parameters

__all__ = ['CandidateScoring']

log = logging.getLogger('darwinlm_foundry.search.engine')


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


def _digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def _collect_new_objects_only():
    """Within the block, ``gc.collect()`` looks only at objects created inside it.

    A fitted candidate is freed by a full collection (its Trainer is a reference cycle), and a full
    collection walks every object of the process: ~0.35 s with torch, transformers and Composer loaded, more
    than a small offspring's whole fit. Objects alive on entry are frozen (they stay alive anyway, the block
    is one selection step) and unfrozen on exit; a process that froze its objects itself is left as it is.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_DROP_OUTPUTS = None
# Candidates whose estimated fit memory (``_candidate_memory_bytes``) is below this do not give their heap back
# to the OS (after each batch and each candidate): trimming releases pages the next batch faults in again
# (30-50 ms a trim on the tiny demo model, where the whole fit takes a few hundred MB and cannot pile up).
TRIM_ABOVE_BYTES = 2 ** 30


def _drop_outputs(trim_every_batch: bool = True):
    """A Composer callback for the fits' memory: lets go of the model outputs before the backward pass, and
    (``trim_every_batch``) gives the heap freed by each batch back to the OS (``utils.memory.trim_heap``).

    Composer keeps ``state.outputs`` (the logits: 4 x 512 x 49152 fp32 = 0.4 GB for SmolLM2) until the next
    batch, for train metrics; the fits have none and the loss is already computed, and autograd does not
    need the logits themselves (the loss keeps its log-softmax), so they are freed before the backward pass
    peaks. Changes no value."""
    global _DROP_OUTPUTS
    if _DROP_OUTPUTS is None:
        from composer.core import Callback

        class DropOutputs(Callback):

            def __init__(self, trim_every_batch: bool):
                self.trim_every_batch = trim_every_batch

            def before_backward(self, state, logger):
                if not state.train_metrics:
                    state.outputs = None

            def batch_end(self, state, logger):
                if self.trim_every_batch:
                    trim_heap()

        _DROP_OUTPUTS = DropOutputs
    return _DROP_OUTPUTS(trim_every_batch)


class CandidateScoring:
    """Per-offspring work of the search (the engine's settings, database, dense getter, tokens and caches are
    set by :class:`~darwinlm_foundry.search.engine.EvolutionarySearch`)."""

    def _candidate_memory_bytes(self) -> int:
        """Rough bytes one candidate's fit needs: fp32 weights, grads, Adam moments, activations, logits."""
        s = self.settings
        params = self.start_parameters
        hidden, vocab = self.spec.hidden_size, self.spec.vocab_size
        acts = s.micro_batch_size * s.seq_len * (self.spec.num_layers * hidden * 34 + vocab * 8)
        return 16 * params + acts

    def _trims_heap(self) -> bool:
        """Whether candidates are large enough to give their freed heap back to the OS (``TRIM_ABOVE_BYTES``)."""
        return self._candidate_memory_bytes() >= TRIM_ABOVE_BYTES

    def _dense(self) -> torch.nn.Module:
        """The database's source model (stitched at its current levels = the model itself), on the device."""
        if self._dense_model is None:
            self._dense_model = self.db.stitch(self._current_levels(), self.get_tensor).to(self.device).eval()
        return self._dense_model

    def _release_dense(self) -> None:
        if not self.settings.keep_dense_resident:
            self._dense_model = None
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()
        self._release_file_maps()
        trim_heap()

    def _release_file_maps(self) -> None:
        """Close the memory-mapped safetensors files of the dense checkpoint and of the database.

        A stitch closes what it mapped; the masked candidates' direct reads of the database do not: every page
        they touched would stay in this process's resident set (up to 0.54 + 0.59 GB for SmolLM2-135M's
        checkpoint and database). (A getter that is a plain function maps nothing.)"""
        for owner in (self.get_tensor, self.db):
            getattr(owner, 'release_file_maps', lambda: None)()

    def build_candidate(self, config: LevelConfig, shared: Optional[dict] = None) -> torch.nn.Module:
        """The candidate as a model on the CPU: stitched and shrunk (or, for benchmarks, masked).

        ``shared``: parts kept across the candidates of one step (see ``SparsityDatabase.stitch``), for
        candidates that are only scored, never trained."""
        t0 = time.perf_counter()
        if self.offspring_format == 'shrunk':
            model = self.db.stitch(config, self.get_tensor, shared=shared)  # (closes the files it mapped)
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
    def _autocast(self, dense: bool = False):
        """bf16 autocast under ``amp_bf16`` (on a CPU with AMX tiles, bf16 matmuls run several times faster than fp32).
        ``dense``: for the dense targets, which stay fp32 on a CPU (computed once per sample, they are the
        reference every candidate is scored against)."""
        if self.precision == 'amp_bf16' and not (dense and self.device.type == 'cpu'):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _logits(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        outs = []
        mb = self.settings.micro_batch_size
        with self._autocast(dense=True):
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
    def _fitness_sums(self, model: torch.nn.Module, tokens: torch.Tensor, targets,
                      wrapped: bool = False) -> tuple[float, int]:
        """(sum of per-token fitness terms, tokens counted) of ``model`` on ``tokens`` (this rank's rows).

        ``wrapped``: ``model`` is the Trainer's wrapped Composer model (FSDP or DDP, see :meth:`fit`), which
        takes a batch dict; every rank then runs as many forwards as the others (``_rows`` gives every rank
        the same row count), since each forward is a collective."""
        head = None
        if wrapped:
            def forward(ids):
                ids = ids.to(self.device)
                return model({'input_ids': ids, 'attention_mask': torch.ones_like(ids)}).logits
        elif self._fused_head(model):
            # the body's hidden states; score_tokens runs the LM head a few tokens at a time, fused with the KL
            head = model.lm_head.weight

            def forward(ids):
                return model.model(input_ids=ids.to(self.device)).last_hidden_state
        else:
            def forward(ids):
                return model(input_ids=ids.to(self.device)).logits
        ppl = self.settings.fitness == 'ppl'
        was_training = model.training
        model.eval()
        with self._autocast():
            scores = score_tokens(forward, tokens, self.settings.micro_batch_size,
                                  targets=None if ppl else targets.rows, nll=ppl, head_weight=head)
        model.train(was_training)
        return scores.sums(self.settings.fitness)

    def _fused_head(self, model: torch.nn.Module) -> bool:
        """Score the KL with the LM head fused into it (:meth:`DenseTargets.kl_hidden`): full-vocabulary KL of a
        DarwinLM model (every candidate, the masked base too) on the CPU (fp32, or bf16 autocast: then the head's
        matmul runs in bf16 and the KL in fp32), where the head's matmul a few tokens at a time gives the values of
        the whole one and a fresh (tokens x vocab) logits block per batch
        (0.4 GB per 2048 SmolLM2 tokens) costs page faults."""
        from darwinlm_foundry.modeling.modeling_darwinlm import DarwinLMForCausalLM

        return (self.settings.fitness == 'kl' and self.device.type == 'cpu'
                and isinstance(model, DarwinLMForCausalLM) and model.lm_head.bias is None)

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
        :meth:`_fitness_sums`).
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
                # no tokenizer: the fit saves nothing, and Composer would count its vocabulary every fit
                cmodel = HuggingFaceModel(model, tokenizer=None, use_logits=True, metrics=[], shift_labels=True)
                optimizer = DecoupledAdamW(cmodel.parameters(), lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
                                           weight_decay=0.0)
                kwargs = {}
                if self.mode == 'fsdp' and self.device.type == 'cuda':
                    # (on CPU Composer wraps the model in DDP by itself: the world is W ranks here)
                    kwargs['parallelism_config'] = {'fsdp': {'sharding_strategy': 'FULL_SHARD',
                                                             'mixed_precision': 'DEFAULT',
                                                             'use_orig_params': True}}
                with transient_trainer(model=cmodel, train_dataloader=self._loader, max_duration=f'{steps}ba',
                                       optimizers=optimizer, device=self._composer_device(),
                                       precision=self.precision if self.device.type == 'cuda' else 'fp32',
                                       device_train_microbatch_size=min(s.micro_batch_size, per_rank_batch),
                                       seed=seed, progress_bar=False, log_to_console=False, loggers=[],
                                       callbacks=[_drop_outputs(self._trims_heap())],
                                       save_folder=None, train_subset_num_batches=-1, **kwargs) as trainer:
                    t1 = time.perf_counter()
                    # Composer's amp_bf16 is a no-op on a CPU: autocast the fit here (fp32 master weights)
                    with (self._autocast() if self.device.type == 'cpu' else contextlib.nullcontext()):
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
            rows = self._rows(fit_tokens)
            if train_tokens is not None and self.cache.directory is None and self._spills(rows):
                # fine-tuning steps: large targets wait in a file while each candidate trains (the fit's own
                # peak is the search's largest), then are read back a micro-batch at a time
                targets = self._spill_dense_targets(rows, f'step_{generation}_{step}')
            else:
                targets = self.dense_targets(key, rows)
                self._release_dense()
        fit_seed = derive_seed(s.seed, 'fit', generation, step)
        n = len(candidates)
        if self.mode == 'offspring_parallel':
            mine = list(range(self.rank, n, self.world_size))
        else:
            mine = list(range(n))
        sums = torch.zeros(n, dtype=torch.float64)
        counts = torch.zeros(n, dtype=torch.float64)
        # scored-only candidates are assembled from one step-wide set of units (each unit at each level built
        # once, the embedding and head never copied); fitted ones are built whole, since the fit changes them.
        # The set lasts while calls are for the same step (run() drops it after each step).
        shared = None
        if train_tokens is None and self.share_units:
            if self._step_parts is None or self._step_parts[0] != key:
                self._step_parts = (key, {})
            shared = self._step_parts[1]
        with _collect_new_objects_only():
            for i in mine:
                model = self.build_candidate(candidates[i], shared)
                scored = model.to(self.device)
                if train_tokens is not None:
                    scored = self.fit(model, self._rows(train_tokens), fit_seed)
                t0 = time.perf_counter()
                if self.mode == 'fsdp':
                    # only a fitted candidate is the Trainer's wrapped model; an unfitted one (KL-only search) is
                    # the plain module, each rank scoring its own rows of the sample
                    total, count = self._fitness_sums(scored, self._rows(fit_tokens), targets,
                                                      wrapped=train_tokens is not None)
                else:
                    total, count = self._fitness_sums(scored, fit_tokens, targets)
                self.stats['fitness_seconds'] += time.perf_counter() - t0
                sums[i], counts[i] = total, count
                self.stats['evaluations'] += 1
                del model, scored
                if train_tokens is not None:
                    gc.collect()  # the fit's Trainer is a reference cycle that still holds the candidate
                if self._trims_heap():
                    trim_heap()
        del shared
        # this step's sample is never scored again (keys name the generation and step)
        self._drop_spilled(targets)
        del targets
        self.cache.forget(key)
        # fsdp: every rank scored its rows of every candidate; otherwise exactly one rank scored each
        # candidate and the others contribute exact zeros. Either way the sums over ranks are the totals.
        both = sum_over_ranks(torch.cat([sums, counts]))
        sums, counts = both[:n], both[n:]
        return [self._finish(float(sums[i]), int(counts[i]), s.fitness) for i in range(n)]

    def config_fitness(self, config: LevelConfig, tokens: torch.Tensor, train_tokens=None, seed: int = 0) -> float:
        """Fitness of one configuration on ``tokens`` (optionally after a fit on ``train_tokens``); one rank."""
        targets = None
        if self.settings.fitness != 'ppl':
            targets = self.dense_targets(('eval', _digest(tokens)), tokens)
            self._release_dense()
        model = self.build_candidate(config).to(self.device)
        if train_tokens is not None:
            model = self.fit(model, train_tokens, seed)
        total, count = self._fitness_sums(model, tokens, targets)
        return self._finish(total, count, self.settings.fitness)

    def configs_fitness(self, configs: Sequence[LevelConfig], tokens: torch.Tensor, name: str) -> list[float]:
        """Fitness of each of ``configs`` as stitched on one sample ``tokens``, its dense targets computed once
        and dropped after (kept in a scratch file and read back a micro-batch at a time when larger than
        ``spill_targets_mib``, so a large re-check sample costs no more memory than a fitness step); one rank.
        ``name``: the sample's cache key / scratch file name. The same values as :meth:`config_fitness`."""
        targets, key = None, (name, _digest(tokens))
        if self.settings.fitness != 'ppl':
            if self.cache.directory is None and self._spills(tokens):
                targets = self._spill_dense_targets(tokens, name)
            else:
                targets = self.dense_targets(key, tokens)
                self._release_dense()
        out = []
        for config in configs:
            model = self.build_candidate(config).to(self.device)
            out.append(self._finish(*self._fitness_sums(model, tokens, targets), self.settings.fitness))
            del model
        self._drop_spilled(targets)
        self.cache.forget(key)
        return out

    # -- the probe -----------------------------------------------------------------------------------
    def probe_sample(self) -> Optional[torch.Tensor]:
        """The fixed probe sample (same tokens every generation; None when ``probe_tokens`` is 0)."""
        size = self.settings.probe_size
        if not size:
            return None
        return self.data.sample(self._n_seqs(size), self.settings.seq_len,
                                derive_seed(self.settings.seed, 'probe'))

    def _targets_bytes(self, tokens: torch.Tensor) -> int:
        """Bytes of the prepared dense targets of ``tokens`` (fp32 probabilities per vocabulary entry, or the
        top-k values and indices)."""
        per_token = 12 * self.cache.topk if self.cache.topk else 4 * self.spec.vocab_size
        return tokens.numel() * per_token

    def _spills(self, tokens: torch.Tensor) -> bool:
        """Whether dense targets kept across fits go to a scratch file (``spill_targets_mib``)."""
        return self._targets_bytes(tokens) > self.settings.spill_targets_mib * 2 ** 20

    def _spill_dense_targets(self, tokens: torch.Tensor, name: str):
        """Dense targets of ``tokens`` computed one micro-batch at a time, each block written to a scratch file
        as it comes (:class:`~darwinlm_foundry.search.fitness.SpilledTargets`: read back a micro-batch at a time,
        never memory-mapped), so they occupy no memory between reads. The same values as
        :meth:`dense_targets`."""
        from darwinlm_foundry.search.fitness import SpilledTargets

        if self._scratch is None:
            # (a killed search's scratch, 0.8 GB and more for SmolLM2, is removed by the next one here)
            self._scratch = process_scratch_dir(self.settings.dense_cache_dir or self.settings.output_dir,
                                                '.darwinlm_targets_')
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
        probe_in_file = hasattr(self._probe_targets, 'fields')  # spilled (in-memory targets have no files)
        if self._scratch is not None and not probe_in_file and not os.listdir(self._scratch):
            self._drop_scratch()

    def _drop_scratch(self) -> None:
        if hasattr(self._probe_targets, 'fields'):
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
                # needed once per generation: kept in a file, not in memory, when large (for SmolLM2's
                # 49152-token vocabulary 0.8 GB at 4096 tokens, as much as the largest selection step's targets)
                if self._probe_targets is None:
                    if self._spills(tokens):
                        self._probe_targets = self._spill_dense_targets(tokens, 'probe')
                    else:
                        converter = DenseLogitCache(topk=self.cache.topk, prepared=True,
                                                    compute_rows=self.settings.micro_batch_size)
                        self._probe_targets = converter.get_or_compute(
                            ('probe',), tokens, lambda t: self._logits(self._dense(), t))
                        self._release_dense()
                targets = self._probe_targets
            model = self.build_candidate(config).to(self.device)
            sums[0], sums[1] = self._fitness_sums(model, tokens, targets)
            del model
            trim_heap()
        sums = sum_over_ranks(sums)
        value = self._finish(float(sums[0]), int(sums[1]), self.settings.fitness)
        self._probe_memo = (config, value)
        self.stats['probe_evaluations'] += 1
        self.stats['probe_seconds'] += time.perf_counter() - t0
        return value
