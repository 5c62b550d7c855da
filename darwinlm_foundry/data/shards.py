"""The data stage's converter: FineWeb-Edu-style text -> tokenised MDS shards, splits and manifest.

* :func:`convert_to_mds` turns JSON-lines / parquet text (local files, directories, globs, or fsspec
  URIs) into llm-foundry's pre-tokenised MDS format (column ``tokens``, ``ndarray:int32``, one
  ``seq_len`` chunk per sample, the layout ``llmfoundry``'s ``convert_dataset_hf/json`` scripts write
  and ``StreamingTextDataset`` reads), with a quality-score filter and document-level
  calibration / search / train / held-out splits, plus an exact ``manifest.json``.
* Sources (embedded text, files, URIs, readers) are in :mod:`darwinlm_foundry.data.sources`; checks,
  loaders and samplers of converted shards in :mod:`darwinlm_foundry.data.loaders`.

Importing this module is cheap: ``streaming`` (~15 s with torch) is imported only where shards are
written or read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from darwinlm_foundry.data.sources import _expand_sources, _is_uri, _iter_docs, _strip_file_scheme, source_name
from darwinlm_foundry.utils.io import atomic_write_json

__all__ = [
    'DEFAULT_SPLITS',
    'MANIFEST_NAME',
    'TOKENS_COLUMN',
    'convert_to_mds',
    'doc_tokens',
    'split_texts_by_source',
    'pack_documents',
    'read_manifest',
    'split_of',
]

MANIFEST_NAME = 'manifest.json'
TOKENS_COLUMN = {'tokens': 'ndarray:int32'}  # what llm-foundry's converters write
DEFAULT_SPLITS: dict[str, float] = {'calibration': 0.05, 'search': 0.05, 'train': 0.8, 'heldout': 0.1}
_TOKENIZE_BATCH = 256  # documents per tokenizer call (the fast tokenizer batches in Rust)


# ----------------------------------------------------------------------------- splits


def _validate_splits(splits: Mapping[str, float | int | None]) -> dict[str, float | int | None]:
    if not splits:
        raise ValueError('splits is empty; e.g. {"calibration": 0.05, "search": 0.05, "train": 0.8, "heldout": 0.1}')
    out: dict[str, float | int | None] = {}
    for name, value in splits.items():
        if not name or '/' in name or name.startswith('.'):
            raise ValueError(f'bad split name {name!r}: it becomes a directory name')
        if isinstance(value, bool) or not (value is None or isinstance(value, (int, float))):
            raise ValueError(f'split {name!r}: {value!r} is not a fraction (float), a document count (int) or None')
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError(f'split {name!r}: fraction {value} is outside [0, 1]')
        if isinstance(value, int) and value < 0:
            raise ValueError(f'split {name!r}: document count {value} is negative')
        out[name] = value
    if sum(v is None for v in out.values()) > 1:
        raise ValueError('at most one split may be None ("all remaining documents")')
    if all(isinstance(v, float) for v in out.values()) and sum(out.values()) > 1.0 + 1e-9:
        raise ValueError(f'split fractions sum to {sum(out.values())} > 1')
    return out


def _split_thresholds(splits: dict[str, float | int | None], keys: np.ndarray | None) -> list[tuple[str, float]]:
    """Upper key bound (exclusive) per split, in order: a document goes to the first split whose bound
    exceeds its key; documents above the last bound are unassigned.

    Fractions alone need no pass over the data (bounds are cumulative fractions). Counts (or None)
    need the sorted keys of every document: bounds are the keys at the cumulative count ranks, so the
    counts are exact unless identical texts straddle a bound (they stay together).
    """
    if keys is None:
        bounds, acc = [], 0.0
        for name, frac in splits.items():
            acc += float(frac)
            bounds.append((name, min(acc, 1.0) if acc < 1.0 - 1e-12 else float('inf')))
        return bounds
    n = len(keys)
    counts = {name: (round(v * n) if isinstance(v, float) else v) for name, v in splits.items()}
    fixed = sum(c for c in counts.values() if c is not None)
    if fixed > n:
        raise ValueError(f'splits ask for {fixed} documents but only {n} passed the filter: {counts}')
    counts = {name: (n - fixed if c is None else c) for name, c in counts.items()}
    sorted_keys = np.sort(keys)
    bounds, rank = [], 0
    for name, c in counts.items():
        rank += c
        bounds.append((name, float(sorted_keys[rank]) if rank < n else float('inf')))
    return bounds


def _stratified_fractions(splits: dict[str, float | int | None]) -> dict[str | None, float]:
    """Every split's fraction of each source (None: the unassigned rest when the fractions sum below 1)."""
    if any(isinstance(v, int) for v in splits.values()):
        raise ValueError(f'stratify splits each source by fractions of its text; {splits} has document counts. '
                         'Give fractions (and at most one None for the rest).')
    rest = 1.0 - sum(v for v in splits.values() if v is not None)
    fracs: dict[str | None, float] = {n: (rest if v is None else float(v)) for n, v in splits.items()}
    if None not in splits.values() and rest > 1e-9:
        fracs[None] = rest  # fractions below 1 in all: the rest stays unassigned, as without stratify
    return fracs


def _stratified_assignment(docs: Iterator[tuple[str, Any]], splits: dict[str, float | int | None]
                           ) -> dict[tuple[str, float], str | None]:
    """Split of every (source file, key) of ``docs`` ((file, document) pairs) when each source file is split
    on its own in the given fractions of its characters.

    A source's documents are taken in key order (the seeded hash: a random order); when it has at least one per
    split, the first ones seed every split (so every domain reaches calibration, search and held-out, which a
    corpus-wide draw can miss for a small source); each further one goes to the split furthest below its share
    so far. Every split then holds its fraction of every source within about two documents.
    """
    fracs = _stratified_fractions(splits)
    active = [n for n, f in fracs.items() if f > 0]
    per_source: dict[str, list[tuple[float, int]]] = {}
    for source, doc in docs:
        per_source.setdefault(source, []).append((doc.key, len(doc.text)))
    out: dict[tuple[str, float], str | None] = {}
    for source, items in per_source.items():
        items.sort()
        chars = dict.fromkeys(active, 0)
        seeded = len(items) >= len(active)
        total = 0
        for i, (key, n) in enumerate(items):
            total += n
            name = (active[i] if seeded and i < len(active)
                    else max(active, key=lambda s: fracs[s] * total - chars[s]))  # ties: the earlier split
            chars[name] += n
            out.setdefault((source, key), name)  # identical texts (same key) stay with the first one's split
    return out


def _assigned_docs(files: list[tuple[str, Any]], splits: dict[str, float | int | None], *, text_key: str,
                   score_key: str | None, min_score: float | None, seed: int, max_chars: int | None,
                   stratify: bool, stats: dict) -> Iterator[tuple[str | None, str, Any]]:
    """(split or None, source name, document) of every document that passes the filter, in file order: the
    one assignment the converter writes and :func:`split_texts_by_source` reads back."""
    args = (text_key, score_key, min_score, seed)

    def docs(count: dict):
        for path, fs in files:
            for doc in _iter_docs([(path, fs)], *args, count, max_chars):
                yield path, doc

    if stratify:  # per file (not per short name: two dirs may hold files of the same name)
        table = _stratified_assignment(docs({'read': 0, 'filtered_out': 0, 'empty': 0}), splits)
        for path, doc in docs(stats):
            yield table[(path, doc.key)], source_name(path), doc
        return
    keys = None
    if any(not isinstance(v, float) for v in splits.values()):  # counts: bounds come from every document's key
        keys = np.array([doc.key for _, doc in docs({'read': 0, 'filtered_out': 0, 'empty': 0})])
    bounds = _split_thresholds(splits, keys)
    for path, doc in docs(stats):
        yield split_of(doc.key, bounds), source_name(path), doc


def split_of(key: float, bounds: Sequence[tuple[str, float]]) -> str | None:
    """Name of the split whose key range holds ``key`` (None: unassigned)."""
    for name, upper in bounds:
        if key < upper:
            return name
    return None


# ----------------------------------------------------------------------------- tokenising


def doc_tokens(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each document as written to the shards.

    Like llm-foundry's ``ConcatTokensDataset`` with ``eos_text`` = the tokenizer's EOS: the
    tokenizer's own special tokens (BOS for Llama) then the text then EOS (not doubled when the
    tokenizer already appends it), so documents are separated by EOS in the token stream.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f'tokenizer {tokenizer.name_or_path!r} has no EOS token; the converter separates '
                         'documents with EOS. Set tokenizer.eos_token first.')
    encoded = tokenizer(list(texts), truncation=False, padding=False, verbose=False)['input_ids']
    return [ids if (ids and ids[-1] == eos) else ids + [eos] for ids in encoded]


class _Packer:
    """Concatenates document tokens and emits full ``seq_len`` chunks (the remainder is kept)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.pending: list[np.ndarray] = []
        self.pending_len = 0

    def add(self, ids: list[int]) -> Iterator[np.ndarray]:
        self.pending.append(np.asarray(ids, dtype=np.int32))
        self.pending_len += len(ids)
        if self.pending_len < self.seq_len:
            return
        flat = np.concatenate(self.pending)
        n_full = len(flat) // self.seq_len
        for i in range(n_full):
            yield flat[i * self.seq_len:(i + 1) * self.seq_len]
        rest = flat[n_full * self.seq_len:]
        self.pending = [rest] if len(rest) else []
        self.pending_len = len(rest)


# ----------------------------------------------------------------------------- converter


def _tokenizer_info(tokenizer) -> dict[str, Any]:
    vocab = tokenizer.get_vocab()
    vocab_hash = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return {
        'name': tokenizer.name_or_path,
        'class': type(tokenizer).__name__,
        'vocab_size': len(tokenizer),
        'vocab_sha256_16': vocab_hash,
        'bos_token_id': tokenizer.bos_token_id,
        'eos_token_id': tokenizer.eos_token_id,
        'pad_token_id': tokenizer.pad_token_id,
    }


def _source_info(files: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Local sources by content (hashing is cheap next to tokenizing them); remote ones by size."""
    info = []
    for path, fs in files:
        if fs is None:
            digest = hashlib.sha256()
            with open(path, 'rb') as f:
                for block in iter(lambda: f.read(1 << 22), b''):
                    digest.update(block)
            info.append({'path': path, 'bytes': os.path.getsize(path), 'sha256': digest.hexdigest()})
        else:
            info.append({'path': path, 'bytes': fs.size(path)})
    return info


def _settings_fingerprint(settings: dict[str, Any]) -> str:
    """What the shards depend on: local sources by name and content, the tokenizer by its vocabulary.

    Where the files or the tokenizer live, and their mtimes, do not count: a dataset copied or re-mounted
    elsewhere with the same bytes reuses its conversion.
    """
    key = dict(settings)
    key['sources'] = [{**src, 'path': os.path.basename(src['path'])} if 'sha256' in src else src
                      for src in settings['sources']]
    key['tokenizer'] = {k: v for k, v in settings['tokenizer'].items() if k != 'name'}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``manifest.json`` that :func:`convert_to_mds` wrote into ``out_dir`` (error if absent)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f'no {MANIFEST_NAME} in {out_dir}: the conversion did not finish; run convert_to_mds')
    return json.loads(path.read_text())


def convert_to_mds(source: str | os.PathLike | Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike,
                   tokenizer,
                   *,
                   seq_len: int,
                   text_key: str = 'text',
                   score_key: str | None = 'score',
                   min_score: float | None = None,
                   splits: Mapping[str, float | int | None] | None = None,
                   seed: int = 0,
                   max_doc_chars: int | None = None,
                   stratify: bool = False,
                   compression: str | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Convert JSON-lines / parquet text to tokenised MDS splits under ``out_dir/<split>/``.

    Args:
        source: file(s), directory(ies) (searched recursively), glob(s), or fsspec URIs
            (``hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet`` needs network;
            ``s3://`` needs ``s3fs``) of ``.jsonl[.gz]``, ``.json[.gz]`` or ``.parquet`` files.
        out_dir: local output directory.
        tokenizer: a Hugging Face tokenizer (e.g. the model's); see :func:`doc_tokens` for BOS/EOS.
        seq_len: tokens per sample; the token stream of each split is cut into ``seq_len`` chunks and
            the final partial chunk is dropped.
        text_key / score_key: record fields holding the text and the quality score (FineWeb-Edu:
            ``score`` float or ``int_score``).
        min_score: keep documents with ``score >= min_score``; None keeps everything (sources without
            a score, like RedPajama, need None). Set with a missing score field: KeyError.
        splits: ``{name: fraction | doc count | None}``, in order; None = all remaining documents.
            Documents are assigned by a seeded hash of their text, so splits are disjoint at document
            level and identical texts share a split. Fractions alone take one pass (doc counts are
            then approximately the fractions); counts take an extra reading pass and are exact.
            Default :data:`DEFAULT_SPLITS`. A split with 0 documents is not written.
        seed: changes the document-to-split assignment.
        max_doc_chars: cut longer documents into pieces of at most this many characters (at paragraph breaks)
            before assigning splits, so that a few long documents (books, papers) reach every split; the pieces
            are the "documents" of the split counts. None keeps documents whole.
        stratify: split every source file on its own in the given fractions (by characters, ranked by the
            seeded hash), so that every domain of a mixed corpus reaches calibration, search and held-out in
            proportion; fractions only (one None = the rest). False: one corpus-wide draw.
        compression: MDS shard compression (e.g. ``'zstd'``); None writes raw shards.
        overwrite: replace an existing conversion with different settings. An existing conversion with
            the same settings and unchanged source files is reused (returned as is).

    Returns the manifest (also written atomically to ``out_dir/manifest.json`` once every split is in
    place): exact per-split document, token, sample and dropped-token counts, the filter counts,
    the tokenizer, the sources with sizes, the settings and a fingerprint of them.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f'seq_len must be an int >= 2, got {seq_len!r}')
    out_dir = Path(_strip_file_scheme(os.fspath(out_dir)))
    if _is_uri(os.fspath(out_dir)):
        raise ValueError(f'out_dir {out_dir} must be local; convert locally, then upload the directory '
                         '(streaming reads object-store URIs directly)')
    split_spec = _validate_splits(DEFAULT_SPLITS if splits is None else splits)
    files = _expand_sources(source)
    settings = {
        'seq_len': seq_len, 'text_key': text_key, 'score_key': score_key, 'min_score': min_score,
        'splits': split_spec, 'seed': seed, 'compression': compression, 'columns': TOKENS_COLUMN,
        'tokenizer': _tokenizer_info(tokenizer), 'sources': _source_info(files),
        'doc_format': 'tokenizer(text) special tokens + EOS after each document (llm-foundry ConcatTokensDataset)',
    }
    if max_doc_chars is not None:  # recorded only when set: conversions made before these options keep their key
        if isinstance(max_doc_chars, bool) or not isinstance(max_doc_chars, int) or max_doc_chars < 1:
            raise ValueError(f'max_doc_chars must be a positive int (characters) or None, got {max_doc_chars!r}')
        settings['max_doc_chars'] = max_doc_chars
    if stratify:
        settings['stratify'] = True
        _stratified_fractions(split_spec)  # document counts fail here, before reading
    fingerprint = _settings_fingerprint(settings)

    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get('fingerprint') == fingerprint:
            if 'source_rows' in old:
                return old
            overwrite = True  # the same conversion by an older converter (no source row ranges): redo it
        elif not overwrite:
            raise FileExistsError(f'{out_dir} already holds a conversion with different settings or sources; '
                                  'pass overwrite=True or choose another out_dir')
    elif out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f'{out_dir} exists, is not empty and has no {MANIFEST_NAME} (an interrupted or '
                              'foreign conversion); pass overwrite=True or choose another out_dir')

    from streaming import MDSWriter  # heavy import (torch, transformers): only when really writing

    t0 = time.time()
    stats = {'read': 0, 'filtered_out': 0, 'empty': 0, 'unassigned': 0}
    assigned = _assigned_docs(files, split_spec, text_key=text_key, score_key=score_key, min_score=min_score,
                              seed=seed, max_chars=max_doc_chars, stratify=stratify, stats=stats)
    by_source: dict[str, dict[str, int]] = {}

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.staging-', dir=out_dir))
    per_split = {name: {'docs': 0, 'doc_tokens': 0, 'samples': 0} for name in split_spec}
    packers = {name: _Packer(seq_len) for name in split_spec}
    # Per split, contiguous row ranges [source, first, end) in row order: documents are written in file order,
    # so each source's rows are one run (a row is credited to the document that completes it).
    source_rows: dict[str, list[list]] = {name: [] for name in split_spec}
    writers: dict[str, Any] = {}
    try:
        def writer_for(name: str):
            if name not in writers:
                writers[name] = MDSWriter(out=str(staging / name), columns=TOKENS_COLUMN,
                                          compression=compression, size_limit=1 << 26)
            return writers[name]

        def flush(batch: list[tuple[str, str, str]]) -> None:
            for (name, source, _), ids in zip(batch, doc_tokens(tokenizer, [t for _, _, t in batch])):
                entry = per_split[name]
                entry['docs'] += 1
                entry['doc_tokens'] += len(ids)
                runs = source_rows[name]
                for chunk in packers[name].add(ids):
                    writer_for(name).write({'tokens': chunk})
                    if runs and runs[-1][0] == source:
                        runs[-1][2] += 1
                    else:
                        runs.append([source, entry['samples'], entry['samples'] + 1])
                    entry['samples'] += 1

        batch: list[tuple[str, str]] = []
        for name, source, doc in assigned:
            if name is None:
                stats['unassigned'] += 1
                continue
            counts = by_source.setdefault(source, {})
            counts[name] = counts.get(name, 0) + 1
            batch.append((name, source, doc.text))
            if len(batch) >= _TOKENIZE_BATCH:
                flush(batch)
                batch = []
        flush(batch)
        for w in writers.values():
            w.finish()

        for name, entry in per_split.items():
            if entry['docs'] and not entry['samples']:
                raise ValueError(f'split {name!r} got {entry["docs"]} documents with only {entry["doc_tokens"]} '
                                 f'tokens, fewer than seq_len={seq_len}; give it more documents or lower seq_len')
            entry['tokens'] = entry['samples'] * seq_len
            entry['dropped_tokens'] = entry['doc_tokens'] - entry['tokens']
            entry['written'] = bool(entry['samples'])
        if not any(e['samples'] for e in per_split.values()):
            raise ValueError(f'no documents left after filtering ({stats}); lower min_score or check text_key')

        # Move finished splits into place, then publish the manifest last: it marks completion.
        if manifest_path.exists():
            manifest_path.unlink()
        for name in split_spec:
            target = out_dir / name
            if target.exists():
                shutil.rmtree(target)
            if name in writers:
                os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    manifest = {
        'format': 'darwinlm-foundry/mds-tokens/v1',
        'fingerprint': fingerprint,
        **settings,
        'split_order': list(split_spec),  # the manifest's keys are sorted; the split bounds follow this order
        'documents': {**stats, 'kept': sum(e['docs'] for e in per_split.values())},
        'split_counts': per_split,
        'source_docs': {src: dict(sorted(c.items())) for src, c in sorted(by_source.items())},  # per source, split
        'source_rows': {name: runs for name, runs in source_rows.items() if runs},  # per split: [source, first, end)
        'total_tokens': sum(e['tokens'] for e in per_split.values()),
        'seconds': round(time.time() - t0, 3),
    }
    atomic_write_json(manifest_path, manifest, indent=2, sort_keys=True, newline=True)
    return manifest


def split_texts_by_source(shards_dir: str | os.PathLike, split: str = 'heldout') -> dict[str, list[str]]:
    """The documents of one split of a conversion, grouped by source file (e.g. held-out text per domain).

    Re-reads the sources the manifest names and re-applies the same filter and seeded document hash, so the
    documents are exactly those whose tokens went into ``split`` (never into calibration, search or train).
    """
    manifest = read_manifest(shards_dir)
    order = manifest.get('split_order')
    if order is None:
        raise ValueError(f'{shards_dir} was converted before split_order was recorded; re-run the data stage '
                         '(delete its manifest.json) to score held-out text per source.')
    spec = {name: manifest['splits'][name] for name in order}
    if split not in spec:
        raise ValueError(f'{shards_dir} has no split {split!r} (splits: {order})')
    files = _expand_sources([src['path'] for src in manifest['sources']])
    out: dict[str, list[str]] = {}
    for name, source, doc in _assigned_docs(
            files, spec, text_key=manifest['text_key'], score_key=manifest['score_key'],
            min_score=manifest['min_score'], seed=manifest['seed'], max_chars=manifest.get('max_doc_chars'),
            stratify=manifest.get('stratify', False), stats={'read': 0, 'filtered_out': 0, 'empty': 0}):
        if name == split:
            out.setdefault(source, []).append(doc.text)
    return out


def pack_documents(tokenizer, texts: Sequence[str], seq_len: int, max_sequences: int | None = None) -> np.ndarray:
    """Documents tokenised and packed into ``seq_len`` sequences exactly as the converter writes them."""
    packer, rows = _Packer(seq_len), []
    for i in range(0, len(texts), _TOKENIZE_BATCH):
        for ids in doc_tokens(tokenizer, texts[i:i + _TOKENIZE_BATCH]):
            rows.extend(packer.add(ids))
            if max_sequences is not None and len(rows) >= max_sequences:
                return np.stack(rows[:max_sequences])
    return np.stack(rows) if rows else np.zeros((0, seq_len), dtype=np.int32)
