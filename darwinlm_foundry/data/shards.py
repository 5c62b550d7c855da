"""Data for DarwinLM stages: FineWeb-Edu-style text -> tokenised MDS shards, checks, loaders, samplers.

* :func:`convert_to_mds` turns JSON-lines / parquet text (local files, directories, globs, or fsspec
  URIs) into llm-foundry's pre-tokenised MDS format (column ``tokens``, ``ndarray:int32``, one
  ``seq_len`` chunk per sample, the layout ``llmfoundry``'s ``convert_dataset_hf/json`` scripts write
  and ``StreamingTextDataset`` reads), with a quality-score filter and document-level
  calibration / search / train / held-out splits, plus an exact ``manifest.json``.
* :func:`check_shards` validates a split (local path or object-store URI) before any compute.
* :func:`text_dataloader_cfg` returns the ``train_loader:`` dict foundry's ``build_text_dataloader``
  takes; :func:`build_text_loader` builds it (imports llm-foundry).
* :func:`sample_sequences` draws seeded token sequences from a local split (for the search).
* :func:`embedded_text_files` / :func:`embedded_tokenizer` give the real text and Llama-2 tokenizer
  shipped inside the package, so the tiny default runs without ``../shared`` or a network.

Importing this module is cheap: ``streaming`` (~15 s with torch) is imported only where shards are
written or fetched, and llm-foundry only by :func:`build_text_loader`.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from darwinlm_foundry.utils.io import atomic_write_json

__all__ = [
    'DEFAULT_SPLITS',
    'MANIFEST_NAME',
    'TOKENS_COLUMN',
    'build_text_loader',
    'check_shards',
    'convert_to_mds',
    'doc_tokens',
    'embedded_text_files',
    'split_texts_by_source',
    'pack_documents',
    'embedded_tokenizer',
    'embedded_tokenizer_dir',
    'read_manifest',
    'sample_sequences',
    'stop_streaming',
    'split_of',
    'text_dataloader_cfg',
]

MANIFEST_NAME = 'manifest.json'
TOKENS_COLUMN = {'tokens': 'ndarray:int32'}  # what llm-foundry's converters write
DEFAULT_SPLITS: dict[str, float] = {'calibration': 0.05, 'search': 0.05, 'train': 0.8, 'heldout': 0.1}
_TEXT_SUFFIXES = ('.jsonl', '.json', '.jsonl.gz', '.json.gz', '.parquet')
_ASSETS = Path(__file__).resolve().parent.parent / 'assets'
_TOKENIZE_BATCH = 256  # documents per tokenizer call (the fast tokenizer batches in Rust)


# ----------------------------------------------------------------------------- embedded default


EMBEDDED_SOURCES = {'embedded': ('text',), 'embedded_mix': ('text', 'text_more')}


def embedded_text_files(name: str = 'embedded') -> list[Path]:
    """Paths of the real text shipped with the package (gzip JSON lines with a ``text`` field).

    ``embedded``: a few MB of the RedPajama sample (books, C4, Wikipedia), enough to pretrain the tiny
    default model and to run the tiny chain with no data outside the repository. ``embedded_mix`` adds
    RedPajama arxiv, common crawl, github and stackexchange: a calibration / search / training mix
    without code or Q&A makes a pruned real model worse on code.
    """
    if name not in EMBEDDED_SOURCES:
        raise ValueError(f'unknown embedded source {name!r}; choose one of {sorted(EMBEDDED_SOURCES)}')
    files = sorted(f for folder in EMBEDDED_SOURCES[name] for f in (_ASSETS / folder).glob('*.jsonl.gz'))
    if not files:
        raise FileNotFoundError(f'no embedded text under {_ASSETS / "text"}; the package install is incomplete '
                                '(package_data must include assets/)')
    return files


def embedded_tokenizer_dir() -> Path:
    """Directory of the embedded Llama-2 tokenizer, loadable by ``AutoTokenizer.from_pretrained``.

    Use it as foundry's ``tokenizer: {name: <this path>}``. It holds the SentencePiece model and a
    config only; the fast tokenizer is converted from it on load (about a second, offline).
    """
    path = _ASSETS / 'llama2_tokenizer'
    if not (path / 'tokenizer.model').is_file():
        raise FileNotFoundError(f'embedded tokenizer missing at {path}; the package install is incomplete')
    return path


def load_tokenizer(spec: str):
    """The tokenizer a data stage names: ``'embedded'`` (the shipped Llama-2 tokenizer) or a HF name / directory."""
    from transformers import AutoTokenizer
    return embedded_tokenizer() if spec == 'embedded' else AutoTokenizer.from_pretrained(spec)


def embedded_tokenizer():
    """The Llama-2 tokenizer (``LlamaTokenizerFast``, vocab 32000) loaded offline from the package.

    BOS is added by default, EOS is not (the converter appends it after each document). The pad
    token is ``<unk>`` rather than EOS: foundry's language-modelling collator masks labels equal to
    the pad id, and masking EOS would hide every document boundary from the loss.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))


# ----------------------------------------------------------------------------- source reading


def _is_uri(path: str) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (one-letter schemes are drive letters)."""
    scheme = urllib.parse.urlparse(path).scheme
    return len(scheme) > 1 and scheme != 'file'


def _strip_file_scheme(path: str) -> str:
    return path[len('file://'):] if path.startswith('file://') else path


def _remote_fs(uri: str):
    """An fsspec filesystem for ``uri``, or a clear error saying how to get one / go local."""
    import fsspec

    try:
        fs, _ = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise RuntimeError(
            f'cannot open remote source {uri!r}: {err}. Install the fsspec backend for this scheme '
            '(e.g. `pip install s3fs` for s3://, `gcsfs` for gs://; hf:// ships with huggingface_hub) or '
            'download the files and pass a local path.') from err
    return fs


def _expand_sources(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[str, Any]]:
    """Expand files / directories / globs / URIs into a sorted list of ``(path, fs_or_None)``."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError('source is empty: pass a file, directory, glob or list of them')
    out: list[tuple[str, Any]] = []
    for item in items:
        item = _strip_file_scheme(os.fspath(item))
        if _is_uri(item):
            fs = _remote_fs(item)
            try:
                if any(ch in item for ch in '*?['):
                    found = fs.glob(item)
                elif fs.isdir(item):
                    found = [p for p in fs.find(item) if p.endswith(_TEXT_SUFFIXES)]
                else:
                    found = [item] if fs.exists(item) else []
            except Exception as err:  # network / auth problems surface here, before any tokenising
                raise RuntimeError(f'could not list remote source {item!r}: {err!r}. Check the URI and '
                                   'credentials, or download the files and pass a local path.') from err
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            found = [p if '://' in p else f'{protocol}://{p}' for p in found]
            out += [(p, fs) for p in sorted(found) if p.endswith(_TEXT_SUFFIXES)]
            if not found:
                raise FileNotFoundError(f'remote source {item!r} matched no {_TEXT_SUFFIXES} files')
            continue
        if any(ch in item for ch in '*?['):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob('*') if p.is_file() and str(p).endswith(_TEXT_SUFFIXES))
        elif os.path.isfile(item):
            found = [item]
        else:
            raise FileNotFoundError(f'source {item!r} does not exist (expected a file, directory or glob)')
        if not found:
            raise FileNotFoundError(f'source {item!r} contains no {_TEXT_SUFFIXES} files')
        bad = [p for p in found if not p.endswith(_TEXT_SUFFIXES)]
        if bad:
            raise ValueError(f'unsupported source file type: {bad[0]!r}; expected one of {_TEXT_SUFFIXES}')
        out += [(str(Path(p).resolve()), None) for p in found]
    return out


def _open_binary(path: str, fs):
    return fs.open(path, 'rb') if fs is not None else open(path, 'rb')


def _iter_json_records(path: str, fs) -> Iterator[dict]:
    with _open_binary(path, fs) as raw:
        stream = gzip.open(raw) if path.endswith('.gz') else raw
        text = io.TextIOWrapper(stream, encoding='utf-8')
        first = text.read(1)
        while first and first.isspace():
            first = text.read(1)
        if first == '[':  # a JSON array file rather than JSON lines
            yield from json.loads(first + text.read())
            return
        pending = first
        for lineno, line in enumerate(text, start=1):
            line = pending + line
            pending = ''
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f'{path}: line {lineno} is not valid JSON ({err})') from err


def _iter_parquet_records(path: str, fs, columns: list[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with _open_binary(path, fs) as raw:
        pf = pq.ParquetFile(raw)
        present = [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=1024, columns=present):
            yield from batch.to_pylist()


@dataclass(frozen=True)
class _Doc:
    text: str
    key: float  # seeded hash of the text in [0, 1): decides the split


def _doc_key(text: str, seed: int) -> float:
    """Seeded, process-independent hash of a document's text, uniform in [0, 1).

    Hashing the text (not the position) keeps exact duplicates in one split, so a held-out document
    can never also be a training document, whatever the file order.
    """
    digest = hashlib.blake2b(text.encode('utf-8'), digest_size=8, key=f'darwinlm-split-{seed}'.encode()).digest()
    return int.from_bytes(digest, 'big') / 2.0**64


def _iter_docs(files: list[tuple[str, Any]], text_key: str, score_key: str | None, min_score: float | None,
               seed: int, stats: dict) -> Iterator[_Doc]:
    """Yield the documents that pass the score filter; count read / filtered / empty ones in ``stats``."""
    for path, fs in files:
        records = (_iter_parquet_records(path, fs, [text_key] + ([score_key] if score_key else []))
                   if path.endswith('.parquet') else _iter_json_records(path, fs))
        for rec in records:
            if text_key not in rec:
                raise KeyError(f'{path}: a record has no text field {text_key!r} (fields: {sorted(rec)}); '
                               'set text_key to the column holding the document text')
            stats['read'] += 1
            if min_score is not None:
                if score_key is None or score_key not in rec:
                    raise KeyError(f'{path}: min_score={min_score} needs the quality field {score_key!r}, but a '
                                   f'record has only {sorted(rec)}; set score_key to the score column or '
                                   'min_score=None to keep every document')
                score = rec[score_key]
                if score is None or float(score) < min_score:
                    stats['filtered_out'] += 1
                    continue
            text = rec[text_key]
            if not isinstance(text, str) or not text.strip():
                stats['empty'] += 1
                continue
            yield _Doc(text, _doc_key(text, seed))


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
    fingerprint = _settings_fingerprint(settings)

    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get('fingerprint') == fingerprint:
            return old
        if not overwrite:
            raise FileExistsError(f'{out_dir} already holds a conversion with different settings or sources; '
                                  'pass overwrite=True or choose another out_dir')
    elif out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f'{out_dir} exists, is not empty and has no {MANIFEST_NAME} (an interrupted or '
                              'foreign conversion); pass overwrite=True or choose another out_dir')

    from streaming import MDSWriter  # heavy import (torch, transformers): only when really writing

    t0 = time.time()
    stats = {'read': 0, 'filtered_out': 0, 'empty': 0, 'unassigned': 0}
    needs_counts = any(not isinstance(v, float) for v in split_spec.values())
    keys = None
    if needs_counts:
        pass_stats = {'read': 0, 'filtered_out': 0, 'empty': 0}
        keys = np.array([d.key for d in _iter_docs(files, text_key, score_key, min_score, seed, pass_stats)])
    bounds = _split_thresholds(split_spec, keys)

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.staging-', dir=out_dir))
    per_split = {name: {'docs': 0, 'doc_tokens': 0, 'samples': 0} for name in split_spec}
    packers = {name: _Packer(seq_len) for name in split_spec}
    writers: dict[str, Any] = {}
    try:
        def writer_for(name: str):
            if name not in writers:
                writers[name] = MDSWriter(out=str(staging / name), columns=TOKENS_COLUMN,
                                          compression=compression, size_limit=1 << 26)
            return writers[name]

        def flush(batch: list[tuple[str, str]]) -> None:
            for (name, _), ids in zip(batch, doc_tokens(tokenizer, [t for _, t in batch])):
                entry = per_split[name]
                entry['docs'] += 1
                entry['doc_tokens'] += len(ids)
                for chunk in packers[name].add(ids):
                    writer_for(name).write({'tokens': chunk})
                    entry['samples'] += 1

        batch: list[tuple[str, str]] = []
        for doc in _iter_docs(files, text_key, score_key, min_score, seed, stats):
            name = split_of(doc.key, bounds)
            if name is None:
                stats['unassigned'] += 1
                continue
            batch.append((name, doc.text))
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
        'total_tokens': sum(e['tokens'] for e in per_split.values()),
        'seconds': round(time.time() - t0, 3),
    }
    atomic_write_json(manifest_path, manifest, indent=2, sort_keys=True, newline=True)
    return manifest


def source_name(path: str) -> str:
    """A source file's short name (``redpajama_github1`` for ``.../redpajama_github1.jsonl.gz``)."""
    name = os.path.basename(path.rstrip('/'))
    for suffix in sorted(_TEXT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


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
    args = (manifest['text_key'], manifest['score_key'], manifest['min_score'], manifest['seed'])
    keys = None
    if any(not isinstance(v, float) for v in spec.values()):  # counts: bounds come from every document's key
        keys = np.array([d.key for d in _iter_docs(files, *args, {'read': 0, 'filtered_out': 0, 'empty': 0})])
    bounds = _split_thresholds(spec, keys)
    out: dict[str, list[str]] = {}
    for path, fs in files:
        texts = [d.text for d in _iter_docs([(path, fs)], *args, {'read': 0, 'filtered_out': 0, 'empty': 0})
                 if split_of(d.key, bounds) == split]
        if texts:
            out.setdefault(source_name(path), []).extend(texts)
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

    return build_dataloader(cfg, tokenizer, device_batch_size)


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


def sample_sequences(split_dir: str | os.PathLike, n_seqs: int, seq_len: int | None = None,
                     seed: int = 0) -> 'torch.LongTensor':  # noqa: F821
    """``n_seqs`` distinct samples of a local MDS split as a ``(n_seqs, seq_len)`` LongTensor.

    Samples are drawn without replacement by a permutation seeded with ``seed``: the same seed always
    gives the same tensor, different seeds give different draws. ``seq_len`` (default: the stored
    length) may be shorter than the stored samples; each sample's first ``seq_len`` tokens are used.
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
