"""Calibration for the OBS pass: input Hessians of every unit's output matrix, block by block.

:func:`iter_layer_hessians` runs the calibration sequences through the decoder one layer at a time: it
captures the inputs of layer 0 (and the exact keyword arguments the model passes to its layers: causal
mask, position ids, rotary ``position_embeddings``), then for each layer moves it to ``device``, hooks the
*inputs* of ``self_attn.o_proj`` and ``mlp.down_proj``, runs every sequence through it, keeps its dense
outputs as the next layer's inputs and moves it back. Only one layer and one batch of activations are on
the accelerator at a time; everything else stays on ``offload_device``. Hessians are fp32
``H = 2 X^T X / n`` over the non-padding tokens.

Distributed: every rank passes its own share of the sequences and a ``reduce_fn`` that sums a tensor over
ranks in place (e.g. ``torch.distributed.all_reduce``); sums of ``X^T X`` and token counts are reduced
before dividing, so every rank ends with the Hessians of all sequences. :func:`solve_units` spreads the
per-unit OBS solves round-robin over ranks; gathering the results is the caller's.

Needs torch only (no Composer).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from darwinlm_foundry.obs.solver import ObsLevel, structured_obs
from darwinlm_foundry.structure.units import Unit

__all__ = ['CalibrationConfig', 'HessianStat', 'PhaseClock', 'sync', 'CalibrationBatch', 'iter_layer_hessians',
           'collect_hessians', 'solve_units', 'unit_output_weight', 'identity_reduce']


@dataclass
class CalibrationConfig:
    """Where the database's calibration sequences come from (a local MDS split written by data.convert_to_mds)."""

    shards: str
    split: str = 'calibration'
    num_sequences: int = 2048
    seq_len: int = 4096
    batch_size: int = 8
    seed: int = 0
    dampening: float = 0.01
    mlp_multiple: int = 32
    num_levels: Optional[int] = None  # default: 10, fewer for models with < 10 heads (levels.auto_num_levels)
    mlp_level_split: int = 1  # finer MLP levels: each level's MLP step cut into this many (LevelSpec.mlp_split)
    device: Optional[str] = None  # default: cuda when available

    def __post_init__(self):
        if self.num_sequences < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError('num_sequences, seq_len and batch_size must be positive')
        if self.mlp_level_split < 1:
            raise ValueError(f'mlp_level_split must be >= 1, got {self.mlp_level_split}')


ReduceFn = Callable[[torch.Tensor], Optional[torch.Tensor]]


@dataclass
class HessianStat:
    """Input Hessian ``H = 2 X^T X / n_tokens`` (fp32, undampened) of one unit's output matrix."""

    unit: Unit
    hessian: torch.Tensor
    n_tokens: int


@dataclass
class CalibrationBatch:
    """One batch of calibration sequences: ``input_ids`` (B, T) and an optional 0/1 ``attention_mask``."""

    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, batch) -> 'CalibrationBatch':
        """From a tensor, a ``CalibrationBatch`` or a dataloader dict with ``input_ids`` (labels are ignored)."""
        if isinstance(batch, cls):
            return batch
        if torch.is_tensor(batch):
            ids, mask = batch, None
        elif isinstance(batch, Mapping) and 'input_ids' in batch:
            ids, mask = batch['input_ids'], batch.get('attention_mask')
        else:
            raise ValueError(f'a calibration batch must be an input_ids tensor or a dict with input_ids, got '
                             f'{type(batch).__name__}')
        if ids.dim() == 1:
            ids = ids[None]
            mask = None if mask is None else mask[None]
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: the model's own fast path, and every token counts
        return cls(ids, mask)


def identity_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The single-process ``reduce_fn``."""
    return tensor


def _to(obj, device):
    """Move tensors (also inside tuples / lists / dicts) to ``device``; other values unchanged."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or (not torch.is_tensor(a) and not torch.is_tensor(b) and a == b)


class _StopForward(Exception):
    pass


@torch.no_grad()
def _capture_layer0_inputs(model, batches: Iterable, device, offload_device):
    """Hidden states entering layer 0 and the layer call's keyword arguments, per batch (offloaded).

    Runs the model's own forward up to layer 0 (embeddings, rotary embeddings, causal mask), so the kwargs
    are exactly those a full forward would pass. Identical kwargs of successive batches are stored once.
    """
    base = model.model
    layer0 = base.layers[0]
    others = [m for name, m in base.named_children() if name != 'layers']
    for m in others:
        m.to(device)
    captured = {}

    def catch(module, args, kwargs):
        captured['hidden'] = args[0] if args else kwargs.pop('hidden_states')
        captured['kwargs'] = {k: v for k, v in kwargs.items() if k != 'hidden_states'}
        raise _StopForward

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    hiddens, kwargs_list, masks = [], [], []
    try:
        for raw in batches:
            batch = CalibrationBatch.of(raw)
            ids = batch.input_ids.to(device)
            mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
            try:
                base(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - a model whose layers are never called
                raise RuntimeError('layer 0 was never called during the forward; is this a decoder model?')
            hiddens.append(captured['hidden'].to(offload_device))
            kw = _to(captured['kwargs'], offload_device)
            if kwargs_list:  # share unchanged kwargs (masks, rotary tables) instead of storing copies
                prev = kwargs_list[-1]
                kw = {k: prev[k] if k in prev and _same(prev[k], v) else v for k, v in kw.items()}
            kwargs_list.append(kw)
            masks.append(None if batch.attention_mask is None else batch.attention_mask.bool().to(offload_device))
    finally:
        handle.remove()
        for m in others:
            m.to(offload_device)
    if not hiddens:
        raise ValueError('no calibration batches were given')
    return hiddens, kwargs_list, masks


def sync(device) -> None:
    """Wait for the accelerator (timings of asynchronous CUDA work); a no-op on CPU."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


class PhaseClock:
    """Wall and CPU seconds accumulated per phase name (``wall[name]``, ``cpu[name]``); CUDA is synchronised
    at both ends of a timed span so that asynchronous work lands in its own phase."""

    def __init__(self, device='cpu'):
        self.device = device
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    @contextlib.contextmanager
    def span(self, name: str):
        sync(self.device)
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            sync(self.device)
            self.add(name, time.perf_counter() - w, time.process_time() - c)


class _Accumulator:
    """Forward hook summing ``X^T X`` (fp32) and the token count of a Linear layer's input."""

    def __init__(self, clock: Optional[PhaseClock] = None):
        self.xtx = None
        self.n = 0
        self.token_mask = None  # (B*T,) bool of the current batch, or None: all tokens
        self.clock = clock  # times the hook as 'hessian'

    def __call__(self, module, inputs, output):
        if self.clock is None:
            return self._accumulate(inputs)
        with self.clock.span('hessian'):
            self._accumulate(inputs)

    def _accumulate(self, inputs):
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if self.token_mask is not None:
            x = x[self.token_mask.to(x.device)]
        x = x.float()
        if self.xtx is None:
            self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        self.xtx.addmm_(x.T, x)
        self.n += x.shape[0]


def _unit_module(layer, kind):
    """The output Linear of a layer's unit, or None when the unit is removed."""
    parent = layer.self_attn if kind == 'attn' else layer.mlp
    if parent is None:
        return None
    return parent.o_proj if kind == 'attn' else parent.down_proj


def unit_output_weight(model, unit: Unit) -> torch.Tensor:
    """The current output matrix (``o_proj`` / ``down_proj`` weight) of ``unit`` in ``model``."""
    module = _unit_module(model.model.layers[unit.layer], unit.kind)
    if module is None:
        raise ValueError(f'{unit} is removed in this model; it has no output matrix')
    return module.weight.detach()


@torch.no_grad()
def iter_layer_hessians(model, batches: Iterable, *, device='cpu', offload_device='cpu',
                        units: Optional[Iterable[Unit]] = None,
                        progress: Optional[Callable[[int, int], None]] = None,
                        reduce_fn: ReduceFn = identity_reduce,
                        clock: Optional[PhaseClock] = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(layer, {Unit: HessianStat})`` layer by layer (see the module docstring).

    ``units``: only these units get Hessians (default: every unit that exists); layers after the last one
    needed are not run. ``progress(layer, num_layers)`` is called after each layer. ``reduce_fn(t)`` sums
    ``t`` over ranks in place (or returns the sum); the token counts go through it as an int64 tensor.
    Layers are moved back to ``offload_device`` after use; the model's train/eval mode is restored.
    ``clock``: a :class:`PhaseClock` that receives the ``'hessian'`` seconds (the ``X^T X`` hooks, reduction
    and scaling); everything else this generator does is the calibration forward.
    """
    layers = model.model.layers
    wanted = None if units is None else set(units)
    needed = [i for i, layer in enumerate(layers) for kind in ('attn', 'mlp')
              if _unit_module(layer, kind) is not None and (wanted is None or Unit(i, kind) in wanted)]
    if not needed:
        return
    last = max(needed)
    was_training = model.training
    model.eval()
    try:
        hiddens, kwargs_list, masks = _capture_layer0_inputs(model, batches, device, offload_device)
        for i in range(last + 1):
            layer = layers[i].to(device)
            accs, handles = {}, []
            for kind in ('attn', 'mlp'):
                module = _unit_module(layer, kind)
                if module is not None and (wanted is None or Unit(i, kind) in wanted):
                    accs[Unit(i, kind)] = acc = _Accumulator(clock)
                    handles.append(module.register_forward_hook(acc))
            try:
                prev_kw, kw_dev = None, None
                for b, hidden in enumerate(hiddens):
                    if kwargs_list[b] is not prev_kw:
                        prev_kw, kw_dev = kwargs_list[b], _to(kwargs_list[b], device)
                    token_mask = None if masks[b] is None else masks[b].reshape(-1)
                    for acc in accs.values():
                        acc.token_mask = token_mask
                    out = layer(hidden.to(device), **kw_dev)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    hiddens[b] = out.to(offload_device)
            finally:
                for h in handles:
                    h.remove()
                layers[i].to(offload_device)
            stats = {}
            t_w, t_c = time.perf_counter(), time.process_time()
            for unit, acc in accs.items():
                xtx = acc.xtx
                count = torch.tensor([acc.n], dtype=torch.int64, device=xtx.device if xtx is not None else device)
                if xtx is None:  # no tokens on this rank: contribute zeros to the sum
                    cols = _unit_module(layer, unit.kind).in_features
                    xtx = torch.zeros(cols, cols, dtype=torch.float32, device=device)
                xtx = _reduced(reduce_fn, xtx)
                n = int(_reduced(reduce_fn, count).item())
                if n == 0:
                    raise ValueError(f'{unit}: no calibration tokens reached it (all padding?)')
                stats[unit] = HessianStat(unit, (xtx * (2.0 / n)).to(offload_device), n)
            if clock is not None:
                clock.add('hessian', time.perf_counter() - t_w, time.process_time() - t_c)
            if progress is not None:
                progress(i, len(layers))
            yield i, stats
    finally:
        model.train(was_training)


def _reduced(reduce_fn: ReduceFn, tensor: torch.Tensor) -> torch.Tensor:
    out = reduce_fn(tensor)
    return tensor if out is None else out


def collect_hessians(model, batches: Iterable, *, device='cpu', offload_device='cpu',
                     units: Optional[Iterable[Unit]] = None,
                     progress: Optional[Callable[[int, int], None]] = None,
                     reduce_fn: ReduceFn = identity_reduce) -> dict[Unit, HessianStat]:
    """All Hessians of :func:`iter_layer_hessians` in one dict (keeps every Hessian in memory)."""
    out: dict[Unit, HessianStat] = {}
    for _, stats in iter_layer_hessians(model, batches, device=device, offload_device=offload_device,
                                        units=units, progress=progress, reduce_fn=reduce_fn):
        out.update(stats)
    return out


def solve_units(weights_by_unit: Mapping[Unit, torch.Tensor], hessians: Mapping[Unit, object], level_spec,
                dampening: float = 0.01, rank: int = 0, world_size: int = 1, *, device=None,
                solver: Callable[..., list[ObsLevel]] = structured_obs,
                clock: Optional[PhaseClock] = None) -> dict[Unit, dict[int, ObsLevel]]:
    """OBS-solve this rank's share of the units: ``{unit: {level: ObsLevel}}`` for the levels it can take.

    Units (the keys of ``weights_by_unit``, sorted) are dealt round-robin: rank ``r`` solves units
    ``r, r + world_size, ...``. ``hessians[unit]`` is a :class:`HessianStat` or a tensor. Levels are those
    of ``level_spec.levels_available`` (from the unit's current level up), their keep counts in the unit's
    *current* structures. Results are on CPU; the solve runs on ``device`` (default: where W is).
    ``clock``: a :class:`PhaseClock` receiving each unit's seconds as ``'solve.attn'`` / ``'solve.mlp'``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} is outside [0, {world_size})')
    out: dict[Unit, dict[int, ObsLevel]] = {}
    for unit in sorted(weights_by_unit)[rank::world_size]:
        W = weights_by_unit[unit]
        H = hessians[unit]
        H = H.hessian if isinstance(H, HessianStat) else H
        levels = level_spec.levels_available(unit.kind, unit.layer)
        keeps = [level_spec.keep(unit.kind, l) for l in levels]
        g = level_spec.structure_size(unit.kind)
        if W.shape[1] != keeps[0] * g:
            raise ValueError(f'{unit}: output matrix has {W.shape[1]} columns but its current level '
                             f'{levels[0]} keeps {keeps[0]} structures of {g}; the level spec does not match '
                             f'the model')
        with clock.span(f'solve.{unit.kind}') if clock is not None else contextlib.nullcontext():
            if device is not None:
                W, H = W.to(device), H.to(device)
            results = solver(W, H, g, keeps, dampening)
            out[unit] = {l: ObsLevel(r.keep, r.kept.cpu(), r.weight.cpu(), r.error) for l, r in zip(levels, results)}
    return out
