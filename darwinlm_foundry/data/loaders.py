"""Reading converted shards: checks before compute, llm-foundry's text loader config and loader, and seeded
token samples from a local split (for calibration and the search).

* :func:`check_shards` validates a split (local path or object-store URI) before any compute.
* :func:`text_dataloader_cfg` returns the ``train_loader:`` dict foundry's ``build_text_dataloader``
  takes; :func:`build_text_loader` builds it (imports llm-foundry).
* :func:`sample_sequences` draws seeded token sequences from a local split (for the search).
* :func:`serialized_shm_registration` makes concurrent processes on one node take distinct streaming
  shared-memory prefixes (streaming alone races).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from darwinlm_foundry.data.shards import MANIFEST_NAME
from darwinlm_foundry.data.sources import _is_uri, _strip_file_scheme

__all__ = ['check_shards', 'text_dataloader_cfg', 'build_text_loader', 'stop_streaming', 'sample_sequences',
           'source_rows', 'serialized_shm_registration']


# ----------------------------------------------------------------------------- checks and loaders


def _supported_schemes() -> list[str]:
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS

    return sorted(s for s in DOWNLOADER_MAPPINGS if s)


def _split_path(path_or_uri: str, split: str | None) -> str:
    if not split:
        return path_or_uri
    return path_or_uri.rstrip('/') + '/' + split if _is_uri(path_or_uri) else os.path.join(path_or_uri, split)


def check_shards(path_or_uri: str | os.PathLike, split: str | None = None, *, seq_len: int | None = None,
                 timeout: float = 60.0) -> dict[str, Any]:
    """Fail fast, before any compute, if an MDS split cannot be read; else describe it.

    ``path_or_uri`` is the conversion root (with ``split``) or the split directory itself (no
    ``split``); local paths and object-store URIs (``s3://``, ``gs://``, ``oci://``, ``hf://``, ...,
    whatever streaming supports) alike. Checks: the URI scheme is supported; ``index.json`` exists
    (remote: is downloadable) and parses; the split has samples and a ``tokens`` column; local shard
    files exist; ``seq_len`` (if given) matches the manifest next to the split (if there is one).

    Returns ``{'path', 'split', 'num_samples', 'num_shards', 'columns', 'seq_len'}`` (``seq_len`` from
    the manifest, None when there is none).
    """
    raw = _strip_file_scheme(os.fspath(path_or_uri))
    where = _split_path(raw, split)
    remote = _is_uri(raw)
    if remote:
        scheme = urllib.parse.urlparse(raw).scheme
        supported = _supported_schemes()
        if scheme not in supported:
            raise ValueError(f'unsupported URI scheme {scheme!r} in {raw!r}; streaming reads {supported} '
                             '(or pass a local path)')
        from streaming.base.storage.download import CloudDownloader

        with tempfile.TemporaryDirectory() as tmp:
            local_index = os.path.join(tmp, 'index.json')
            try:
                CloudDownloader.direct_download(where + '/index.json', local_index, timeout)
            except Exception as err:
                raise FileNotFoundError(f'cannot fetch {where}/index.json ({err!r}); check the URI, split name '
                                        'and credentials') from err
            index = json.loads(Path(local_index).read_text())
    else:
        if not os.path.isdir(where):
            raise FileNotFoundError(f'shard directory {where} does not exist; run convert_to_mds (or check the '
                                    'split name)')
        index_path = os.path.join(where, 'index.json')
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f'{where} has no index.json: not an MDS split (or its conversion did not '
                                    'finish); re-run convert_to_mds')
        try:
            index = json.loads(Path(index_path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f'{index_path} is not valid JSON ({err}); re-run convert_to_mds') from err
    shards = index.get('shards', [])
    num_samples = sum(int(s.get('samples', 0)) for s in shards)
    if not shards or num_samples == 0:
        raise ValueError(f'split at {where} is empty (0 samples); give the split documents when converting')
    columns = shards[0].get('column_names', [])
    if 'tokens' not in columns and 'text' not in columns:
        raise ValueError(f'split at {where} has columns {columns}; foundry text loaders need `tokens` or `text`')
    if not remote:
        for s in shards:
            names = [s.get('raw_data', {}).get('basename'), (s.get('zip_data') or {}).get('basename')]
            if not any(n and os.path.isfile(os.path.join(where, n)) for n in names):
                raise FileNotFoundError(f'shard {names[0]} listed in {where}/index.json is missing; the split '
                                        'is incomplete, re-run convert_to_mds')
            for part in (s.get('raw_data'), s.get('zip_data')):  # a truncated copy reads as garbage later
                path = os.path.join(where, part['basename']) if part and part.get('basename') else None
                if path and os.path.isfile(path) and part.get('bytes') is not None \
                        and os.path.getsize(path) != int(part['bytes']):
                    raise ValueError(f'shard {path} has {os.path.getsize(path)} bytes but {where}/index.json '
                                     f'says {part["bytes"]}: truncated or overwritten; copy it again or re-run '
                                     'convert_to_mds')
    manifest_seq_len = None
    if not remote and split:
        mpath = Path(raw) / MANIFEST_NAME
        if mpath.is_file():
            manifest_seq_len = json.loads(mpath.read_text()).get('seq_len')
    if seq_len is not None and manifest_seq_len is not None and seq_len > manifest_seq_len:
        raise ValueError(f'{where} holds {manifest_seq_len}-token samples but seq_len={seq_len} was asked; '
                         'reconvert with the longer seq_len')
    return {'path': where, 'split': split, 'num_samples': num_samples, 'num_shards': len(shards),
            'columns': columns, 'seq_len': manifest_seq_len}


def _default_cache_dir(remote: str) -> str:
    digest = hashlib.sha256(remote.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), 'darwinlm_mds_cache', digest)


def text_dataloader_cfg(local_or_remote: str | os.PathLike, split: str, seq_len: int, batch_size: int | None = None,
                        *, shuffle: bool = True, shuffle_seed: int = 0, num_workers: int = 0,
                        drop_last: bool = True, cache_dir: str | None = None,
                        **dataset_kwargs: Any) -> dict[str, Any]:
    """The foundry ``train_loader:`` / ``eval_loader:`` dict for one split of a conversion.

    ``local_or_remote`` is the conversion root: a local directory, or an object-store URI (then
    ``cache_dir`` is the local download cache, by default a per-URI temp directory). The result is
    what llm-foundry's YAML takes (``name: text``, ``dataset: {local, remote, split, max_seq_len,
    shuffle, shuffle_seed, ...}``, ``drop_last``, ``num_workers``); pass it with the device batch size
    to :func:`build_text_loader` or ``llmfoundry.data.dataloader.build_dataloader``.
    Foundry takes the batch size separately (``device_train_batch_size``), so ``batch_size`` only
    sets streaming's ``batch_size`` hint inside ``dataset`` when given. Extra ``dataset_kwargs`` are
    passed to streaming (e.g. ``predownload``, ``num_canonical_nodes``).
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f'seq_len must be a positive int, got {seq_len!r}')
    root = _strip_file_scheme(os.fspath(local_or_remote))
    if _is_uri(root):
        local, remote = cache_dir or _default_cache_dir(root), root
    else:
        local, remote = str(Path(root).resolve()), None
    dataset = {'local': local, 'remote': remote, 'split': split, 'max_seq_len': seq_len,
               'shuffle': shuffle, 'shuffle_seed': shuffle_seed, **dataset_kwargs}
    if batch_size is not None:
        dataset['batch_size'] = batch_size
    cfg = {'name': 'text', 'dataset': dataset, 'drop_last': drop_last, 'num_workers': num_workers}
    if num_workers == 0:  # torch's DataLoader rejects these two without worker processes
        cfg.update(prefetch_factor=None, persistent_workers=False)
    return cfg


def build_text_loader(cfg: Mapping[str, Any], tokenizer, device_batch_size: int):
    """Build foundry's text dataloader (a Composer ``DataSpec``) from :func:`text_dataloader_cfg`'s dict.

    Runs :func:`check_shards` first so a missing split fails before llm-foundry (and streaming's
    shared memory) start. Imports llm-foundry (~25 s the first time).
    """
    import copy

    cfg = copy.deepcopy(dict(cfg))
    ds = cfg['dataset']
    check_shards(ds['remote'] or ds['local'], ds.get('split'), seq_len=ds.get('max_seq_len'))
    cfg['dataset'].pop('batch_size', None)  # foundry sets it from device_batch_size
    from llmfoundry.data.dataloader import build_dataloader

    with serialized_shm_registration():
        return build_dataloader(cfg, tokenizer, device_batch_size)


def _shm_lock_path() -> str:
    # Shared-memory names are node-global (/dev/shm), so the lock lives there too: a per-user TMPDIR would not
    # exclude another process.
    return os.path.join('/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir(),
                        'darwinlm_streaming_prefix.lock')


def _flock_within(fh, timeout: float) -> bool:
    """Take an exclusive flock on ``fh`` within ``timeout`` seconds; False (and a warning) when it stays held."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                warnings.warn(f'{fh.name} stayed locked for {timeout:.0f} s (a process hung while registering a '
                              'streaming dataset?); registering without it', RuntimeWarning, stacklevel=3)
                return False
            time.sleep(0.05)


@contextlib.contextmanager
def serialized_shm_registration(timeout: float = 60.0):
    """While active, every ``StreamingDataset`` built in this process registers its shared-memory prefix under
    a node-wide file lock.

    streaming picks a prefix by probing ``/dev/shm`` for the first free one and then creating it; two processes
    (two jobs on one node, two test workers) that probe at the same moment pick the same one and the second
    dies with ``FileExistsError: '/0000NN_locals'``. Only the local leader takes the lock: the other ranks wait
    for it at streaming's own barriers inside the registration, and the lock is held for the registration
    alone, not for the dataset's life. A lock still held after ``timeout`` seconds (its holder hung) is
    skipped with a warning, so one stuck process cannot stop every later job on the node. Wrap code that
    builds datasets inside libraries (foundry's ``train()``).
    """
    import streaming.base.dataset as sd

    original = sd.get_shm_prefix
    if getattr(original, '_darwinlm_serialized', False):  # nested: already installed
        yield
        return

    def locked(streams_local, streams_remote, world, *args, **kwargs):
        if not world.is_local_leader:
            return original(streams_local, streams_remote, world, *args, **kwargs)
        with open(_shm_lock_path(), 'a+') as fh:
            held = _flock_within(fh, timeout)
            try:
                return original(streams_local, streams_remote, world, *args, **kwargs)
            finally:
                if held:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    locked._darwinlm_serialized = True
    sd.get_shm_prefix = locked
    try:
        yield
    finally:
        sd.get_shm_prefix = original


def stop_streaming(loader) -> None:
    """Stop the download / ready threads of the streaming dataset behind ``loader`` (a ``DataSpec``, a torch
    ``DataLoader`` or the dataset itself).

    A ``Trainer.fit`` that ends mid-epoch (``max_duration`` in batches) leaves them polling until the process
    exits; in a process that runs many short fits (post-training, benchmarks) they pile up and eat the CPU.
    """
    dataset = getattr(getattr(loader, 'dataloader', loader), 'dataset', loader)
    iterator = getattr(dataset, '_iterator', None)
    if iterator is not None:
        iterator.exit()


# ----------------------------------------------------------------------------- sampling


def _local_split_samples(split_dir: str) -> tuple[list, np.ndarray]:
    """MDS readers of a local split and the cumulative sample count at the end of each shard."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    index = json.loads(Path(split_dir, 'index.json').read_text())
    readers = []
    for obj in index['shards']:
        reader = reader_from_json(split_dir, None, obj)
        raw_path = os.path.join(split_dir, obj['raw_data']['basename'])
        if not os.path.isfile(raw_path) and obj.get('zip_data'):
            # Compressed-only shards: unpack the raw file once, as StreamingDataset does for a local copy.
            data = Path(split_dir, obj['zip_data']['basename']).read_bytes()
            tmp = f'{raw_path}.tmp-{os.getpid()}'
            Path(tmp).write_bytes(decompress(obj['compression'], data))
            os.replace(tmp, raw_path)
        readers.append(reader)
    ends = np.cumsum([r.samples for r in readers])
    return readers, ends


def source_rows(split_dir: str | os.PathLike, num_samples: int | None = None) -> dict[str, 'np.ndarray']:
    """Row indices of every source in a local split, from the conversion's manifest (``source_rows``: runs
    ``[source, first, end)`` that tile the split's rows in order; ``num_samples``: the split's, when the caller
    has read it already)."""
    split_dir = Path(_strip_file_scheme(os.fspath(split_dir)))
    mpath = split_dir.parent / MANIFEST_NAME
    runs = None
    if mpath.is_file():
        runs = json.loads(mpath.read_text()).get('source_rows', {}).get(split_dir.name)
    if runs is None:
        raise ValueError(f'{split_dir} has no per-source row ranges ({mpath} lacks source_rows: written before '
                         'they were recorded, or not by data.convert_to_mds); convert the text again with '
                         'convert_to_mds (it redoes an older conversion of the same settings by itself), or sample '
                         'without by_source')
    samples = check_shards(split_dir)['num_samples'] if num_samples is None else num_samples
    if [r[1] for r in runs] != [0] + [r[2] for r in runs[:-1]] or runs[-1][2] != samples:
        raise ValueError(f'the source row ranges in {mpath} do not tile the {samples} samples of {split_dir}: the '
                         'split and the manifest come from different conversions; convert again')
    out: dict[str, list] = {}
    for name, first, end in runs:  # two runs of one name: two source files of the same short name
        out.setdefault(name, []).append(np.arange(first, end))
    return {name: np.concatenate(parts) for name, parts in sorted(out.items())}


def sample_sequences(split_dir: str | os.PathLike, n_seqs: int, seq_len: int | None = None,
                     seed: int = 0, by_source: bool = False) -> 'torch.LongTensor':  # noqa: F821
    """``n_seqs`` distinct samples of a local MDS split as a ``(n_seqs, seq_len)`` LongTensor.

    Samples are drawn without replacement by a permutation seeded with ``seed``: the same seed always
    gives the same tensor, different seeds give different draws. ``seq_len`` (default: the stored
    length) may be shorter than the stored samples; each sample's first ``seq_len`` tokens are used.

    ``by_source``: balanced over the conversion's source files instead of proportional to their size: the
    sources are taken in seeded random rounds, one sample of each per round (a source with no samples left
    drops out), so any ``n_seqs`` >= the number of sources holds every source, and a draw of fewer holds
    that many different ones. Small samples drawn proportionally hold only the largest sources most of the
    time (a search selecting on them then favours whatever helps the few domains it saw).
    """
    import torch

    split_dir = _strip_file_scheme(os.fspath(split_dir))
    if _is_uri(split_dir):
        raise ValueError(f'sample_sequences reads local splits only, got {split_dir!r}; download it first')
    info = check_shards(split_dir)
    total = info['num_samples']
    if not 0 < n_seqs <= total:
        raise ValueError(f'asked for {n_seqs} sequences but {split_dir} holds {total} samples')
    readers, ends = _local_split_samples(split_dir)
    gen = torch.Generator().manual_seed(seed)
    if by_source:
        groups = source_rows(split_dir, total)
        queues = [rows[torch.randperm(len(rows), generator=gen).numpy()].tolist() for rows in groups.values()]
        picks = []
        while len(picks) < n_seqs:
            for i in torch.randperm(len(queues), generator=gen).tolist():
                if queues[i] and len(picks) < n_seqs:
                    picks.append(queues[i].pop())
    else:
        picks = torch.randperm(total, generator=gen)[:n_seqs].tolist()
    rows = []
    for idx in picks:
        shard = int(np.searchsorted(ends, idx, side='right'))
        start = 0 if shard == 0 else int(ends[shard - 1])
        tokens = readers[shard].get_item(idx - start)['tokens']
        want = len(tokens) if seq_len is None else seq_len
        if want > len(tokens):
            raise ValueError(f'seq_len={seq_len} exceeds the stored sample length {len(tokens)} in {split_dir}')
        rows.append(torch.from_numpy(np.array(tokens[:want], dtype=np.int64)))
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f'{split_dir} holds samples of different lengths; pass seq_len')
    return torch.stack(rows)
