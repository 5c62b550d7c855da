"""The sparsity-level database: per unit and level, the kept structures and compensated output weights.

Layout of ``<db_dir>``::

    manifest.json                 version, model fingerprint, family, level spec (steps), dampening,
                                  calibration info, per-unit records (levels, file, sha256), units_done
    units/attn_03.safetensors     kept.L{l}   int32 indices of the unit's *current* structures kept at level l
                                  weight.L{l} compensated kept columns of the output matrix (o_proj / down_proj),
                                              for every level above the unit's current level

Only the output matrix is stored; the input-matrix rows (q/k/v, gate/up) are sliced from the dense weights
when stitching. At a unit's current level nothing is pruned and the solver leaves the weights as they are,
so that level stores no weight either (the dense one is used).

Writing is unit by unit: each file goes to a temporary name and is moved into place with ``os.replace``,
then the manifest (also replaced atomically) records its sha256. An interrupted build resumes where it
stopped; :meth:`SparsityDatabase.open` refuses a database whose manifest does not match the model, whose
build is incomplete, or whose unit files are missing or corrupt, and reads unit tensors lazily
(memory-mapped ``safe_open``) so stitching a candidate touches only what it needs.

Needs torch, safetensors and transformers (no Composer).
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from darwinlm_foundry.obs.calibration import (PhaseClock, identity_reduce, iter_layer_hessians, solve_units,
                                          unit_output_weight)
from darwinlm_foundry.structure.levels import KINDS, LevelSpec
from darwinlm_foundry.structure.units import Unit, layer_heads, layer_intermediate_size, prunable_units
from darwinlm_foundry.utils.io import atomic_write_json
from darwinlm_foundry.utils.memory import peak_rss_gb

__all__ = ['FORMAT_VERSION', 'DatabaseError', 'BuildInterrupted', 'SparsityDatabase', 'build_database',
           'TensorGetter', 'dense_tensor_getter', 'model_fingerprint', 'torch_distributed_hooks',
           'unit_name', 'is_complete', 'format_build_stats']

FORMAT_VERSION = 1
MANIFEST = 'manifest.json'


class DatabaseError(RuntimeError):
    """The database cannot be used as it is (mismatch, missing or corrupt files, incomplete build)."""


class BuildInterrupted(RuntimeError):
    """Raised by :func:`build_database` when ``stop_after_units`` is reached (a simulated kill)."""


def unit_name(unit: Unit) -> str:
    return f'{unit.kind}_{unit.layer:02d}'


def _unit_from_name(name: str) -> Unit:
    kind, layer = name.rsplit('_', 1)
    return Unit(int(layer), kind)


# --------------------------------------------------------------------------------------------------
# Dense tensors, lazily
# --------------------------------------------------------------------------------------------------
class TensorGetter:
    """``get_tensor(name)`` over an HF safetensors checkpoint (lazy, per tensor) or an in-memory model.

    Raises ``KeyError`` for absent names (what ``build_shrunk_model`` expects for missing biases). A tied
    ``lm_head.weight`` is served from the embeddings. ``config`` is the model's config when known.
    """

    def __init__(self, source: Mapping[str, Any], config=None, files: Optional[Mapping[str, str]] = None):
        self._source = source
        self._files = files or {}
        self._handles: dict[str, Any] = {}
        self.config = config

    def keys(self) -> list[str]:
        return sorted(self._files or self._source)

    def __contains__(self, name: str) -> bool:
        return name in (self._files or self._source)

    def __call__(self, name: str) -> torch.Tensor:
        if name == 'lm_head.weight' and name not in self and getattr(self.config, 'tie_word_embeddings', False):
            name = 'model.embed_tokens.weight'
        if self._files:
            if name not in self._files:
                raise KeyError(f'tensor {name} is not in the checkpoint')
            path = self._files[name]
            if path not in self._handles:
                self._handles[path] = safe_open(path, framework='pt', device='cpu')
            return self._handles[path].get_tensor(name)
        if name not in self._source:
            raise KeyError(f'tensor {name} is not in the model')
        return self._source[name]

    def release_file_maps(self) -> None:
        """Close the checkpoint files mapped by earlier reads (see :meth:`SparsityDatabase.release_file_maps`)."""
        self._handles.clear()


def dense_tensor_getter(model_dir_or_model) -> TensorGetter:
    """A :class:`TensorGetter` over an HF checkpoint directory (``*.safetensors``) or an in-memory model."""
    if isinstance(model_dir_or_model, torch.nn.Module):
        state = {k: v.detach() for k, v in model_dir_or_model.state_dict().items()}
        return TensorGetter(state, config=getattr(model_dir_or_model, 'config', None))
    path = os.fspath(model_dir_or_model)
    files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
    if not files:
        raise FileNotFoundError(f'no *.safetensors files in {path}; save the model with '
                                f'save_pretrained(..., safe_serialization=True) or pass the model itself')
    names = {}
    for file in files:
        with safe_open(file, framework='pt', device='cpu') as f:
            for name in f.keys():
                names[name] = file
    config = None
    if os.path.exists(os.path.join(path, 'config.json')):
        import darwinlm_foundry.modeling  # noqa: F401  (registers the darwinlm config type)
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(path)
    return TensorGetter({}, config=config, files=names)


# --------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------
_SAMPLE = 2048


def _config_fingerprint(config) -> str:
    shapes = [(s.unit.layer, s.unit.kind, s.num_structures, s.structure_size) for s in prunable_units(config)]
    heads = getattr(config, 'layer_heads', None)
    fields = {k: getattr(config, k, None) for k in (
        'hidden_size', 'vocab_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads',
        'intermediate_size', 'tie_word_embeddings', 'head_dim')}
    family = getattr(config, 'base_model_type', None) or config.model_type
    text = json.dumps({'family': family, 'fields': fields, 'units': shapes, 'heads': heads}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(model_or_dir, config=None) -> dict[str, str]:
    """``{'config': sha, 'model': sha}``: cheap but discriminating identity of a model's architecture/weights.

    ``config`` hashes the family, shape fields and every unit's current size; ``model`` additionally hashes
    every tensor's name and shape and ~2K evenly spaced values (as float32, so a dtype cast does not change
    it) of a few tensors spread over the network. Works the same on an in-memory model and on its
    safetensors checkpoint (reads only the sampled values).
    """
    getter = model_or_dir if isinstance(model_or_dir, TensorGetter) else dense_tensor_getter(model_or_dir)
    config = config or getter.config
    if config is None:
        raise ValueError('the model config is needed for a fingerprint; pass config=')
    cfg = _config_fingerprint(config)
    digest = hashlib.sha256(cfg.encode())
    names = [n for n in getter.keys() if not (n == 'lm_head.weight' and config.tie_word_embeddings)]
    shapes = {}
    for name in names:
        shapes[name] = list(getter(name).shape) if not getter._files else None
    if getter._files:  # shapes from the headers, no tensor reads
        for file in sorted(set(getter._files.values())):
            with safe_open(file, framework='pt', device='cpu') as f:
                for name in f.keys():
                    if name in shapes:
                        shapes[name] = list(f.get_slice(name).get_shape())
    digest.update(json.dumps(sorted(shapes.items())).encode())
    last = config.num_hidden_layers - 1
    probes = ['model.embed_tokens.weight', 'model.norm.weight']
    for layer in sorted({0, last // 2, last}):
        probes += [f'model.layers.{layer}.self_attn.o_proj.weight', f'model.layers.{layer}.mlp.down_proj.weight',
                   f'model.layers.{layer}.self_attn.q_proj.weight', f'model.layers.{layer}.mlp.up_proj.weight']
    for name in probes:
        if name not in shapes:
            continue
        flat = getter(name).reshape(-1)
        # float64: float32 cannot hold indices above 2**24 (every real embedding is larger)
        idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLE, flat.numel()), dtype=torch.float64).long()
        digest.update(name.encode())
        digest.update(flat.index_select(0, idx.to(flat.device)).float().cpu().numpy().tobytes())
    return {'config': cfg, 'model': digest.hexdigest()}


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(db_dir: str, manifest: dict) -> None:
    atomic_write_json(os.path.join(db_dir, MANIFEST), manifest, indent=1)


def _read_manifest(db_dir: str) -> Optional[dict]:
    path = os.path.join(db_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DatabaseError(f'{path} is not valid JSON ({err}); the database is damaged: delete {db_dir} and '
                            f'rebuild it with build_database') from err


def is_complete(db_dir) -> bool:
    """Whether ``db_dir`` holds a finished build (its manifest says so); raises on a damaged manifest."""
    manifest = _read_manifest(os.fspath(db_dir))
    return bool(manifest and manifest.get('complete'))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def _write_unit(db_dir: str, unit: Unit, levels: Mapping[int, Any], current_level: int,
                dtype: torch.dtype) -> dict:
    """Write one unit file atomically; return its manifest record fields (file, sha256, bytes)."""
    rel = os.path.join('units', unit_name(unit) + '.safetensors')
    path = os.path.join(db_dir, rel)
    tensors = {}
    for level, res in sorted(levels.items()):
        tensors[f'kept.L{level}'] = res.kept.to(torch.int32).contiguous()
        if level != current_level:
            tensors[f'weight.L{level}'] = res.weight.to(dtype).contiguous()
    tmp = f'{path}.tmp.{os.getpid()}'
    # One metadata key only: safetensors writes its metadata map in hash order, and byte-identical files
    # across builds (resume == uninterrupted) need a deterministic header.
    save_file(tensors, tmp, metadata={'unit': f'{unit_name(unit)} format {FORMAT_VERSION}'})
    with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
    sha = _sha256(tmp)
    os.replace(tmp, path)
    return {'file': rel, 'sha256': sha, 'bytes': os.path.getsize(path)}


# --------------------------------------------------------------------------------------------------
# The database
# --------------------------------------------------------------------------------------------------
class SparsityDatabase:
    """A built, validated database, read lazily. Make one with :meth:`open` or :func:`build_database`."""

    def __init__(self, db_dir: str, manifest: dict, config=None):
        self.db_dir = os.fspath(db_dir)
        self.manifest = manifest
        self.level_spec = LevelSpec.from_dict(manifest['level_spec'])
        self.config = config
        self._handles: dict[str, Any] = {}
        self.build_stats: Optional[dict] = manifest.get('build_stats')  # see build_database

    # -- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(cls, db_dir, model_or_config=None, *, verify: Union[bool, str] = True) -> 'SparsityDatabase':
        """Open and validate the database in ``db_dir``.

        ``model_or_config``: the model (or its checkpoint directory, or a :class:`TensorGetter`) the
        database must belong to (full fingerprint check), or just its config (architecture check), or
        None (no check). ``verify``: True checks every unit file's sha256; ``'size'`` only sizes.
        Raises :class:`DatabaseError` naming what is wrong and what to do.
        """
        db_dir = os.fspath(db_dir)
        manifest = _read_manifest(db_dir)
        if manifest is None:
            raise DatabaseError(f'{db_dir} has no {MANIFEST}: it is not a sparsity database (or its build never '
                                f'started). Build it with build_database(model, batches, "{db_dir}").')
        if manifest.get('version') != FORMAT_VERSION:
            raise DatabaseError(f'{db_dir} has format version {manifest.get("version")}, this code reads '
                                f'version {FORMAT_VERSION}; rebuild the database with build_database.')
        if not manifest.get('complete'):
            done, total = len(manifest.get('units_done', [])), len(manifest['units'])
            raise DatabaseError(f'the build of {db_dir} is incomplete ({done} of {total} units committed); rerun '
                                f'build_database with the same model and arguments to resume it.')
        config = _check_fingerprint(db_dir, manifest, model_or_config)
        db = cls(db_dir, manifest, config)
        if verify:
            db.verify(full=verify is True)
        return db

    def verify(self, full: bool = True) -> None:
        """Check that every unit file exists, has the recorded size and (``full``) the recorded sha256."""
        for name, rec in self.manifest['units'].items():
            if rec['file'] is None:
                continue
            path = os.path.join(self.db_dir, rec['file'])
            if not os.path.exists(path):
                raise DatabaseError(f'unit file {path} is missing; rerun build_database on {self.db_dir} to '
                                    f'rebuild it (the build resumes and redoes only missing units).')
            if os.path.getsize(path) != rec['bytes'] or (full and _sha256(path) != rec['sha256']):
                raise DatabaseError(f'unit file {path} is corrupt (size or sha256 differs from the manifest); '
                                    f'delete it and rerun build_database on {self.db_dir} to rebuild it.')

    # -- contents --------------------------------------------------------------------------------------
    @property
    def units(self) -> list[Unit]:
        return sorted(_unit_from_name(n) for n in self.manifest['units'])

    def current_level(self, unit: Unit) -> int:
        return self.manifest['units'][unit_name(unit)]['current_level']

    def levels(self, unit: Unit) -> list[int]:
        """Levels stored for ``unit`` (gradual mode: from its current level up)."""
        return list(self.manifest['units'][unit_name(unit)]['levels'])

    def _record(self, unit: Unit, level: int) -> dict:
        rec = self.manifest['units'].get(unit_name(unit))
        if rec is None:
            raise KeyError(f'{unit} is not in the database')
        if level not in rec['levels']:
            raise ValueError(f'{unit} has levels {rec["levels"]} in the database, not {level}'
                             + (' (a unit cannot go below its current level)' if level < rec['current_level'] else ''))
        return rec

    def release_file_maps(self) -> None:
        """Close the unit files mapped by earlier reads; the next read opens them again.

        A mapped file stays mapped after a read, and every page a read touched stays in the process's resident
        set (as file pages) while it does: every level a stitch ever used, 0.6 GB for SmolLM2-135M's database,
        per database a long-lived process keeps. The tensors already read are copies and stay valid."""
        self._handles.clear()

    def _file(self, rec: dict):
        path = os.path.join(self.db_dir, rec['file'])
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework='pt', device='cpu')
        return self._handles[path]

    def kept(self, unit: Unit, level: int) -> torch.Tensor:
        """Sorted LongTensor: indices of the unit's current structures kept at ``level``."""
        rec = self._record(unit, level)
        if rec['file'] is None:  # an already removed unit
            return torch.zeros(0, dtype=torch.long)
        return self._file(rec).get_tensor(f'kept.L{level}').long()

    def weight(self, unit: Unit, level: int) -> Optional[torch.Tensor]:
        """Compensated kept output-matrix columns at ``level``; None at the current level (dense weight)."""
        rec = self._record(unit, level)
        if level == rec['current_level'] or rec['file'] is None:
            return None
        return self._file(rec).get_tensor(f'weight.L{level}')

    def stitch(self, levels, dense_get_tensor: Callable[[str], torch.Tensor], config=None,
               shared: Optional[dict] = None):
        """The shrunk DarwinLM model with every unit at ``levels``, built straight from the dense tensors.

        ``levels``: ``{Unit: level}`` for every unit, ``{'attn': [...], 'mlp': [...]}``, a ``LevelConfig``
        or an int (uniform). ``dense_get_tensor``: tensors of the model the database was built from (see
        :func:`dense_tensor_getter`). ``config``: that model's config (default: the one given to
        :meth:`open`, the getter's, or the one recorded in the manifest). Only the kept weights are
        materialised; the result records ``levels`` and the level steps in its config. The files the stitch
        mapped (this database's and the getter's) are closed when it returns (:meth:`release_file_maps`).

        ``shared``: a dict the caller keeps across calls (e.g. the offspring of one selection step, which
        differ in a few units): the first call builds the model whole and remembers its parts; later calls
        build only units at levels not seen yet and assemble the model from the remembered parts
        (:func:`~darwinlm_foundry.structure.shrinking.assemble_shrunk_model`: same values, no copies). Such
        models share tensors with each other: score them, do not train them.
        """
        spec = self.level_spec
        levels = spec.normalise(levels)
        config = config or self.config or getattr(dense_get_tensor, 'config', None) or self._manifest_config()
        try:
            return self._stitch(levels, dense_get_tensor, config, shared)
        finally:
            self.release_file_maps()
            getattr(dense_get_tensor, 'release_file_maps', lambda: None)()  # (a plain function has no maps)

    def _stitch(self, levels: dict, dense_get_tensor, config, shared: Optional[dict]):
        from darwinlm_foundry.structure.shrinking import build_shrunk_model

        if shared and 'template' in shared:
            return self._stitch_shared(levels, dense_get_tensor, config, shared)
        kept, weights = {}, {}
        for kind in KINDS:
            for layer, level in enumerate(levels[kind]):
                unit = Unit(layer, kind)
                self._record(unit, level)
                if level == self.current_level(unit):
                    continue
                kept[unit] = self.kept(unit, level).tolist()
                if kept[unit]:
                    weights[unit] = self.weight(unit, level)
        model = build_shrunk_model(config, dense_get_tensor, kept, weights)
        self._record_levels(model, levels)
        if shared is not None:
            shared['template'] = model
            for layer, parts in enumerate(model.model.layers):
                shared[Unit(layer, 'attn'), levels['attn'][layer]] = (parts.self_attn, parts.input_layernorm,
                                                                       model.config.layer_heads[layer])
                shared[Unit(layer, 'mlp'), levels['mlp'][layer]] = (
                    parts.mlp, parts.post_attention_layernorm, model.config.layer_intermediate_sizes[layer])
        return model

    def _record_levels(self, model, levels: dict) -> None:
        model.config.levels = {k: list(v) for k, v in levels.items()}
        model.config.level_steps = self.level_spec.steps
        model.config.num_levels = self.level_spec.num_levels
        model.config.mlp_level_split = self.level_spec.mlp_split if self.level_spec.mlp_split > 1 else None

    def _stitch_shared(self, levels: dict, dense_get_tensor, config, shared: dict):
        """:meth:`stitch` from the parts in ``shared`` (building and adding the units it lacks)."""
        from darwinlm_foundry.structure.shrinking import assemble_shrunk_model, build_unit_modules
        template = shared['template']
        new_config = copy.copy(template.config)  # shallow: the per-layer lists are replaced below
        new_config.layer_heads = list(template.config.layer_heads)
        new_config.layer_intermediate_sizes = list(template.config.layer_intermediate_sizes)
        missing = []
        for kind in KINDS:
            for layer, level in enumerate(levels[kind]):
                unit = Unit(layer, kind)
                entry = shared.get((unit, level))
                if entry is None:
                    self._record(unit, level)
                    kept = None if level == self.current_level(unit) else self.kept(unit, level).tolist()
                    if kind == 'attn':
                        heads = layer_heads(config, layer)
                        shape = heads if kept is None else [heads[i] for i in kept]
                    else:
                        shape = layer_intermediate_size(config, layer) if kept is None else len(kept)
                    missing.append((unit, level, kept))
                else:
                    shape = entry[2]
                if kind == 'attn':
                    new_config.layer_heads[layer] = shape
                else:
                    new_config.layer_intermediate_sizes[layer] = shape
        dtype = template.model.embed_tokens.weight.dtype
        for unit, level, kept in missing:
            module, norm = build_unit_modules(config, new_config, unit, dense_get_tensor, kept,
                                              None if kept is None else self.weight(unit, level), dtype=dtype)
            shape = new_config.layer_heads[unit.layer] if unit.kind == 'attn' else \
                new_config.layer_intermediate_sizes[unit.layer]
            shared[unit, level] = (module, norm, shape)
        units = {Unit(layer, kind): shared[Unit(layer, kind), level][:2]
                 for kind in KINDS for layer, level in enumerate(levels[kind])}
        model = assemble_shrunk_model(template, new_config, units)
        self._record_levels(model, levels)
        return model

    def _manifest_config(self):
        import darwinlm_foundry.modeling  # noqa: F401  (registers the darwinlm config type)
        from transformers import AutoConfig
        data = dict(self.manifest['config'])
        return AutoConfig.for_model(data.pop('model_type'), **data)

    # -- size ------------------------------------------------------------------------------------------
    def storage_bytes(self) -> int:
        """Bytes on disk: unit files plus manifest."""
        total = os.path.getsize(os.path.join(self.db_dir, MANIFEST))
        return total + sum(rec['bytes'] for rec in self.manifest['units'].values() if rec['file'])

    def dense_per_level_bytes(self) -> int:
        """Bytes the research code's format needs: a full output matrix per level (11 levels) per unit."""
        itemsize = torch.empty(0, dtype=getattr(torch, self.manifest['weight_dtype'])).element_size()
        total = 0
        for name, rec in self.manifest['units'].items():
            if rec['file']:
                kind = 'mlp' if 'mlp' in name else 'attn'
                total += (self.level_spec.top(kind) + 1) * rec['rows'] * rec['columns'] * itemsize
        return total


def _check_fingerprint(db_dir: str, manifest: dict, model_or_config):
    """Compare the manifest's fingerprint with the given model/config; return the config (or None)."""
    if model_or_config is None:
        return None
    want = manifest['fingerprint']
    if isinstance(model_or_config, (torch.nn.Module, TensorGetter, str, os.PathLike)):
        getter = (model_or_config if isinstance(model_or_config, TensorGetter)
                  else dense_tensor_getter(model_or_config))
        got = model_fingerprint(getter)
        key = 'model'
        config = getter.config
    else:
        config = model_or_config
        got = {'config': _config_fingerprint(config)}
        key = 'config'
    if got[key] != want[key]:
        raise DatabaseError(
            f'the database in {db_dir} was built from another model: its {key} fingerprint is {want[key]}, the '
            f'given model\'s is {got[key]}. Rebuild the database for this model (build_database into a new '
            f'directory) or point to the model it was built from ({manifest.get("model_name") or "see manifest"}).')
    return config


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------
def torch_distributed_hooks():
    """``(reduce_fn, gather_fn, rank, world_size)`` over the initialised ``torch.distributed`` group."""
    import torch.distributed as dist

    def reduce_fn(t):
        dist.all_reduce(t)
        return t

    def gather_fn(local):
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local, parts, dst=0)
        return {u: r for part in parts for u, r in part.items()} if parts is not None else {}

    return reduce_fn, gather_fn, dist.get_rank(), dist.get_world_size()


def _settings(spec: LevelSpec, dampening: float, dtype: torch.dtype, source) -> dict:
    return {'level_spec': spec.to_dict(), 'dampening': float(dampening), 'weight_dtype': _dtype_name(dtype),
            'calibration_source': source}


def build_database(model, batches: Iterable, db_dir, *, level_spec: Optional[LevelSpec] = None,
                   dampening: float = 0.01, device='cpu', offload_device='cpu',
                   weight_dtype: Optional[torch.dtype] = None, calibration_source: Optional[str] = None,
                   model_name: Optional[str] = None,
                   stop_after_units: Optional[int] = None,
                   progress: Optional[Callable[[str, int, int], None]] = None,
                   reduce_fn=identity_reduce, gather_fn: Optional[Callable[[dict], dict]] = None,
                   rank: int = 0, world_size: int = 1,
                   log_fn: Optional[Callable[[str], None]] = print,
                   **spec_kwargs) -> Optional[SparsityDatabase]:
    """Calibrate ``model`` on ``batches``, OBS-solve every unit at every level, write the database.

    Resumable: with an incomplete database of the same model and settings in ``db_dir``, committed units
    whose checksum verifies are skipped (the calibration forward still runs through their layers, without
    Hessians). A complete one is returned as is. Another model's or other settings' database is refused.

    ``level_spec``: default ``LevelSpec.from_config(model.config, **spec_kwargs)`` (a DarwinLM model gets its
    current levels: gradual mode, only levels >= them are built). ``weight_dtype``: stored weights' dtype
    (default the model's). ``calibration_source``: free text recorded in the manifest (e.g. the dataset).
    ``progress(stage, done, total)``: called per calibrated layer (``'calibrate'``) and per committed unit
    (``'commit'``); raising from it interrupts the build. ``stop_after_units``: raise
    :class:`BuildInterrupted` after committing that many units in this call (a single-process test hook).

    Distributed: each rank passes its own share of ``batches``, ``reduce_fn`` (sum in place over ranks),
    ``gather_fn`` (merge per-rank solve results onto rank 0) and its ``rank`` / ``world_size`` (see
    :func:`torch_distributed_hooks`). Units are solved round-robin over ranks; rank 0 writes. Returns the
    opened database on rank 0, None on other ranks.

    Rank 0 records where this call's time and memory went in the manifest's ``build_stats`` (see
    :func:`_build_stats`; informational, no check reads it) and on the returned database's ``build_stats``,
    and passes a one-line summary to ``log_fn`` (None: silent).
    """
    clock = PhaseClock(device)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    if torch.device(device).type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    db_dir = os.fspath(db_dir)
    if world_size > 1 and gather_fn is None:
        raise ValueError('world_size > 1 needs a gather_fn (see torch_distributed_hooks)')
    gather_fn = gather_fn or (lambda local: local)
    config = model.config
    spec = level_spec or LevelSpec.from_config(config, **spec_kwargs)
    shapes = {s.unit: s for s in prunable_units(config)}
    first_unit = next(u for u, s in shapes.items() if s.num_structures)
    dtype = weight_dtype or unit_output_weight(model, first_unit).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    settings = _settings(spec, dampening, dtype, calibration_source)
    fingerprint = model_fingerprint(dense_tensor_getter(model))

    manifest = _read_manifest(db_dir)
    if manifest is not None:
        _check_resumable(db_dir, manifest, fingerprint, settings)
        done = _verified_done(db_dir, manifest)
        if manifest.get('complete') and len(done) == len(manifest['units_done']):
            return SparsityDatabase.open(db_dir, config, verify=False) if rank == 0 else None
        manifest['units_done'] = done
        manifest['complete'] = False
    else:
        manifest = _new_manifest(model, spec, shapes, settings, fingerprint, model_name)
    if rank == 0:
        os.makedirs(os.path.join(db_dir, 'units'), exist_ok=True)
        _write_manifest(db_dir, manifest)

    todo = [u for u in sorted(shapes) if shapes[u].num_structures and unit_name(u) not in manifest['units_done']]
    committed_now = 0
    rows_seen = [0]

    def counted(batches):
        for b in batches:
            ids = b if torch.is_tensor(b) else b['input_ids']
            rows_seen[0] += 1 if ids.dim() == 1 else ids.shape[0]
            yield b

    def commit(results):
        nonlocal committed_now
        if rank != 0:
            return
        for unit in sorted(results):
            cur = spec.current_levels[unit.kind][unit.layer]
            with clock.span('write'):
                rec = _write_unit(db_dir, unit, results[unit], cur, dtype)
                manifest['units'][unit_name(unit)].update(rec)
                manifest['units_done'].append(unit_name(unit))
                _write_manifest(db_dir, manifest)
            committed_now += 1
            if progress is not None:
                progress('commit', len(manifest['units_done']), len(manifest['units']))
            if stop_after_units is not None and committed_now >= stop_after_units:
                raise BuildInterrupted(f'stopped after {committed_now} units (stop_after_units)')

    pending: dict = {}
    calib_progress = None if progress is None else (lambda i, n: progress('calibrate', i + 1, n))

    def solve_round():
        weights = {u: unit_output_weight(model, u) for u in pending}
        local = solve_units(weights, pending, spec, dampening, rank, world_size, device=device, clock=clock)
        commit(gather_fn(local))
        pending.clear()

    counted_once = False
    if todo:
        layers = iter_layer_hessians(model, counted(batches), device=device, offload_device=offload_device,
                                     units=todo, progress=calib_progress, reduce_fn=reduce_fn, clock=clock)
        while True:
            with clock.span('calibration'):  # forward + Hessians (the latter also timed on their own)
                item = next(layers, None)
            if item is None:
                break
            stats = item[1]
            if not counted_once:  # every rank, once: all batches were read before the first layer
                counted_once = True
                sequences = torch.tensor([rows_seen[0]], dtype=torch.int64, device=device)  # nccl: on device
                sequences = int(reduce_fn(sequences).item()) if world_size > 1 else rows_seen[0]
                manifest['calibration'].update(sequences=sequences)
            for unit, stat in stats.items():
                manifest['calibration']['tokens'] = stat.n_tokens
                pending[unit] = stat
            if len(pending) >= world_size:
                solve_round()
        if pending:
            solve_round()
    if rank != 0:
        return None
    manifest['complete'] = True
    manifest['completed_at'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
    manifest['build_stats'] = build_stats = _build_stats(clock, t_wall, t_cpu, device, committed_now)
    _write_manifest(db_dir, manifest)
    if log_fn is not None:
        log_fn(format_build_stats(build_stats))
    db = SparsityDatabase.open(db_dir, config, verify=False)
    db.build_stats = build_stats
    return db


PHASES = ('forward', 'hessian', 'solve', 'write', 'other')


def _build_stats(clock: PhaseClock, t_wall: float, t_cpu: float, device, units: int) -> dict:
    """Seconds per phase (wall and process CPU) and peak memory of this build_database call.

    ``forward``: calibration forward passes (layer inputs captured, each layer run on every batch) minus
    ``hessian`` (the ``X^T X`` hooks and the reduction); ``solve``: OBS solves (``solve_attn`` /
    ``solve_mlp`` split; this rank's units); ``write``: unit files, checksums and manifest; ``other``: the
    rest (fingerprint, resume checks, gathering). ``peak_rss_gb``: the process's peak resident memory since
    the run stage began (:func:`~darwinlm_foundry.utils.memory.peak_rss_gb`; on non-Linux systems, since the
    process began); ``peak_cuda_gb``: max_memory_allocated during the
    build on a CUDA device.
    """
    total = {'wall': time.perf_counter() - t_wall, 'cpu': time.process_time() - t_cpu}
    out = {'units_solved': units, 'threads': torch.get_num_threads(), 'device': str(device)}
    for kind, got in (('wall', clock.wall), ('cpu', clock.cpu)):
        t = {'hessian': got.get('hessian', 0.0), 'solve_attn': got.get('solve.attn', 0.0),
             'solve_mlp': got.get('solve.mlp', 0.0), 'write': got.get('write', 0.0)}
        t['forward'] = got.get('calibration', 0.0) - t['hessian']
        t['solve'] = t['solve_attn'] + t['solve_mlp']
        t['other'] = total[kind] - sum(t[p] for p in PHASES if p != 'other')
        t['total'] = total[kind]
        out[f'{kind}_s'] = {k: round(v, 4) for k, v in t.items()}
    out['peak_rss_gb'] = round(peak_rss_gb(), 4)
    if torch.device(device).type == 'cuda':
        out['peak_cuda_gb'] = round(torch.cuda.max_memory_allocated(device) / 2**30, 4)
    return out


def format_build_stats(stats: dict) -> str:
    """The one-line console summary of :func:`_build_stats`."""
    w = stats['wall_s']
    mem = f'peak RSS {stats["peak_rss_gb"]:.2f} GB' + (
        f', peak CUDA {stats["peak_cuda_gb"]:.2f} GB' if 'peak_cuda_gb' in stats else '')
    return (f'[darwinlm] database build: {w["total"]:.1f}s for {stats["units_solved"]} units (calibration forward '
            f'{w["forward"]:.1f}s, Hessians {w["hessian"]:.1f}s, OBS solves {w["solve"]:.1f}s, writes '
            f'{w["write"]:.1f}s, other {w["other"]:.1f}s), {mem}')


def _new_manifest(model, spec, shapes, settings, fingerprint, model_name) -> dict:
    config = model.config
    units = {}
    for unit, shape in sorted(shapes.items()):
        cur = spec.current_levels[unit.kind][unit.layer]
        units[unit_name(unit)] = {
            'layer': unit.layer, 'kind': unit.kind, 'current_level': cur,
            'levels': spec.levels_available(unit.kind, unit.layer),
            'structures': shape.num_structures, 'structure_size': shape.structure_size,
            'rows': config.hidden_size, 'columns': shape.num_structures * shape.structure_size,
            'file': None, 'sha256': None, 'bytes': 0}
    family = getattr(config, 'base_model_type', None) or config.model_type
    return {
        'version': FORMAT_VERSION, 'fingerprint': fingerprint, 'family': family, 'model_name': model_name,
        'num_layers': config.num_hidden_layers, **settings,
        'calibration': {'source': settings['calibration_source'], 'sequences': None, 'tokens': None},
        'config': config.to_dict(), 'units': units, 'units_done': [], 'complete': False,
        'created_at': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }


def _check_resumable(db_dir, manifest, fingerprint, settings) -> None:
    if manifest.get('version') != FORMAT_VERSION:
        raise DatabaseError(f'{db_dir} holds a database of format version {manifest.get("version")}; delete it '
                            f'or build into another directory.')
    if manifest['fingerprint']['model'] != fingerprint['model']:
        raise DatabaseError(
            f'{db_dir} holds a database of another model (fingerprint {manifest["fingerprint"]["model"]}, this '
            f'model {fingerprint["model"]}); build into another directory or delete it.')
    for key, value in settings.items():
        if manifest.get(key) != value:
            raise DatabaseError(f'{db_dir} was started with {key}={manifest.get(key)!r}, this build asks for '
                                f'{value!r}; rerun with the same settings to resume, or build into another '
                                f'directory.')


def _verified_done(db_dir, manifest) -> list[str]:
    """Committed units whose file is present with the recorded checksum (others are redone)."""
    done = []
    for name in manifest.get('units_done', []):
        rec = manifest['units'][name]
        path = os.path.join(db_dir, rec['file']) if rec.get('file') else None
        if path and os.path.exists(path) and os.path.getsize(path) == rec['bytes'] and _sha256(path) == rec['sha256']:
            done.append(name)
    return done
