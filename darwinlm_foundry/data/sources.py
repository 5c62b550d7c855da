"""Text sources of the data stage: the text and Llama-2 tokenizer shipped in the package, local files,
directories, globs and fsspec URIs, and the JSON-lines / parquet readers that yield documents.

:func:`embedded_text_files` / :func:`embedded_tokenizer` give the real text and Llama-2 tokenizer shipped
inside the package, so the tiny default runs without ``../shared`` or a network.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ['EMBEDDED_SOURCES', 'embedded_text_files', 'embedded_tokenizer_dir', 'embedded_tokenizer', 'load_tokenizer',
           'segments', 'source_name']

_TEXT_SUFFIXES = ('.jsonl', '.json', '.jsonl.gz', '.json.gz', '.parquet')
_ASSETS = Path(__file__).resolve().parent.parent / 'assets'


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


def segments(text: str, max_chars: int | None) -> list[str]:
    """``text`` cut into pieces of at most ``max_chars`` characters, at a paragraph break where one lies in
    the second half of the piece (else a line break, else a space, else anywhere). None: ``[text]``.

    A corpus of few long documents (a book, a paper) otherwise lands whole in one split: cut first, its
    pieces spread over every split like other documents.
    """
    if max_chars is None or len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        for sep in ('\n\n', '\n', ' '):
            cut = text.rfind(sep, start + max_chars // 2, end)
            if cut >= 0:
                end = cut + len(sep)
                break
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def _iter_docs(files: list[tuple[str, Any]], text_key: str, score_key: str | None, min_score: float | None,
               seed: int, stats: dict, max_chars: int | None = None) -> Iterator[_Doc]:
    """Yield the documents (pieces of at most ``max_chars`` characters, see :func:`segments`) that pass the
    score filter; count read / filtered / empty records in ``stats``."""
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
            for piece in segments(text, max_chars):
                yield _Doc(piece, _doc_key(piece, seed))


def source_name(path: str) -> str:
    """A source file's short name (``redpajama_github1`` for ``.../redpajama_github1.jsonl.gz``)."""
    name = os.path.basename(path.rstrip('/'))
    for suffix in sorted(_TEXT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name
