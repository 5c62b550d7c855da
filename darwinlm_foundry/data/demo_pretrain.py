"""Stage 0 of the tiny default: pretrain a small dense Llama on the embedded text, cached.

Pruning needs a model whose behaviour is worth preserving; a randomly initialised one is not. This
module trains a tiny ``LlamaForCausalLM`` (real Llama-2 vocabulary, tied embeddings) with a Composer
``Trainer`` on llm-foundry's streaming text dataloader over the converter's ``train`` split, and
saves a Hugging Face directory (model + tokenizer) that later stages load like any checkpoint.

Composer / llm-foundry are imported inside :func:`pretrain_tiny` only (they take ~25 s to import).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from darwinlm_foundry.data.loaders import check_shards, sample_sequences, text_dataloader_cfg
from darwinlm_foundry.data.shards import read_manifest
from darwinlm_foundry.utils.logging import quiet
from darwinlm_foundry.utils.params import count_parameters

__all__ = ['PRETRAIN_RECORD', 'PretrainResult', 'TinyLlamaSettings', 'fit_causal_lm', 'heldout_perplexity',
           'pretrain_tiny']

PRETRAIN_RECORD = 'darwinlm_pretrain.json'  # written last into out_dir: marks a complete, reusable model
_MODEL_FILES = ('config.json', 'model.safetensors', 'tokenizer_config.json')


@dataclass(frozen=True)
class TinyLlamaSettings:
    """Everything that determines the pretrained model (its fingerprint is the cache key)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int | None = None  # None: 4 * hidden (a multiple of 32, as the MLP levels need)
    steps: int = 200
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 10
    seed: int = 0
    eval_seqs: int = 32
    eval_every: int = 25

    def __post_init__(self):
        for name in ('hidden', 'layers', 'heads', 'kv_heads', 'steps', 'seq_len', 'batch_size', 'eval_seqs',
                     'eval_every'):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'{name} must be a positive int, got {value!r}')
        if self.hidden % self.heads:
            raise ValueError(f'hidden={self.hidden} is not divisible by heads={self.heads}')
        if self.heads % self.kv_heads:
            raise ValueError(f'heads={self.heads} is not a multiple of kv_heads={self.kv_heads}')
        if self.intermediate is not None and (self.intermediate < 1 or self.intermediate % 32):
            raise ValueError(f'intermediate={self.intermediate} must be a positive multiple of 32')
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f'warmup={self.warmup} must be in [0, steps={self.steps})')
        if not self.lr > 0:
            raise ValueError(f'lr must be positive, got {self.lr}')

    @property
    def intermediate_size(self) -> int:
        return self.intermediate if self.intermediate is not None else 4 * self.hidden


@dataclass
class PretrainResult:
    """Where the model is and how training went (``curve``: ``[step, held-out perplexity]`` pairs)."""

    path: str
    cached: bool
    ppl_before: float
    ppl_after: float
    curve: list[list[float]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    params: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


def heldout_perplexity(model, tokens, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of ``model`` on a ``(n, seq_len)`` LongTensor (every token weighs the same)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            n = batch.numel() - batch.shape[0]  # predicted positions
            total += float(loss) * n
            count += n
    model.train(was_training)
    return math.exp(total / count)


def fit_causal_lm(model, shards_dir: str | os.PathLike, *, tokenizer, steps: int, batch_size: int, seq_len: int,
                  lr: float, warmup: int = 0, seed: int = 0, split: str = 'train', device: str = 'cpu',
                  alpha_f: float = 0.1, callbacks=()) -> None:
    """Train a Hugging Face causal LM in place: ``steps`` batches of ``batch_size`` x ``seq_len`` tokens.

    A Composer ``Trainer`` over llm-foundry's text loader on ``shards_dir/split`` (shuffled with ``seed``),
    decoupled AdamW (betas 0.9 / 0.95, no weight decay), cosine decay to ``alpha_f * lr`` after ``warmup``
    linear warm-up batches, fp32, no checkpoints. Used for the tiny dense pretraining and for short
    post-training of pruned models (a ``DarwinLMForCausalLM`` trains the same way: only kept weights exist).
    """
    with _quiet():
        from composer.models import HuggingFaceModel
        from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW

        from darwinlm_foundry.data.loaders import build_text_loader, stop_streaming
        from darwinlm_foundry.utils.composer import transient_trainer

        loader = build_text_loader(text_dataloader_cfg(shards_dir, split, seq_len, shuffle=True, shuffle_seed=seed),
                                   tokenizer, batch_size)
        trainer_kwargs = dict(
            model=HuggingFaceModel(model, tokenizer=tokenizer, use_logits=True, metrics=[]),
            train_dataloader=loader,
            max_duration=f'{steps}ba',
            optimizers=DecoupledAdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),
            schedulers=CosineAnnealingWithWarmupScheduler(t_warmup=f'{warmup}ba', alpha_f=alpha_f),
            device='gpu' if str(device).startswith('cuda') else device,
            precision='fp32',
            seed=seed,
            callbacks=list(callbacks),
            loggers=[],
            progress_bar=False,
            log_to_console=False,
            train_subset_num_batches=-1,
        )
        try:
            with transient_trainer(**trainer_kwargs) as trainer:
                trainer.fit()
        finally:
            stop_streaming(loader)


def _shards_fingerprint(shards_dir: str) -> str:
    """The conversion's fingerprint (manifest), or a hash of the train / held-out indexes without one."""
    try:
        return read_manifest(shards_dir)['fingerprint']
    except (FileNotFoundError, KeyError):
        digest = hashlib.sha256()
        for split in ('train', 'heldout'):
            digest.update(Path(shards_dir, split, 'index.json').read_bytes())
        return digest.hexdigest()


def _load_cached(out_dir: Path, fingerprint: str) -> PretrainResult | None:
    record = out_dir / PRETRAIN_RECORD
    if not record.is_file() or not all((out_dir / f).is_file() for f in _MODEL_FILES):
        return None
    data = json.loads(record.read_text())
    if data.get('fingerprint') != fingerprint:
        return None
    data.pop('fingerprint')
    return PretrainResult(**{**data, 'path': str(out_dir), 'cached': True})


def _quiet():
    """Silence Composer / streaming / llm-foundry chatter for the duration of the run, then restore it."""
    return quiet('composer', 'llmfoundry', 'streaming', 'transformers')


def pretrain_tiny(out_dir: str | os.PathLike, *, shards_dir: str | os.PathLike, hidden: int = 128, layers: int = 4,
                  heads: int = 4, kv_heads: int = 2, intermediate: int | None = None, steps: int = 200,
                  seq_len: int = 128, batch_size: int = 8, lr: float = 3e-3, warmup: int = 10, seed: int = 0,
                  eval_seqs: int = 32, eval_every: int = 25, device: str = 'cpu', tokenizer=None,
                  verbose: bool = False) -> PretrainResult:
    """Pretrain a tiny dense Llama on ``shards_dir/train`` and save it as a HF directory in ``out_dir``.

    Cached: when ``out_dir`` already holds a complete model whose fingerprint (all settings plus the
    shards' manifest fingerprint) matches, it is returned at once (``cached=True``). Otherwise the
    model trains in a temporary sibling directory that replaces ``out_dir`` only when complete.

    Training: Composer ``Trainer`` (``HuggingFaceModel`` around ``LlamaForCausalLM`` with tied
    embeddings), llm-foundry's text dataloader (shuffled with ``seed``), decoupled AdamW with a
    cosine schedule after ``warmup`` steps, fp32, deterministic for a given seed and device.
    Held-out perplexity on ``eval_seqs`` sequences of ``shards_dir/heldout`` is measured before,
    every ``eval_every`` steps and after; the curve and the per-step training loss are stored in
    ``out_dir/darwinlm_pretrain.json`` and returned.

    ``tokenizer``: default the embedded Llama-2 tokenizer; it must match the one the shards were
    converted with (checked against the manifest). The defaults (hidden 128, 4 layers, 5.1M parameters
    of which 4.1M are the tied 32000-token embedding, 200 steps of 8 x 128 tokens, about 1 CPU-second
    per step) take a few minutes on an idle 2-core CPU; on the embedded data the held-out perplexity
    falls from ~32900 (random init) to ~1480 (3500 after 25 steps, 2160 after 100).
    """
    settings = TinyLlamaSettings(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                                 intermediate=intermediate, steps=steps, seq_len=seq_len, batch_size=batch_size,
                                 lr=lr, warmup=warmup, seed=seed, eval_seqs=eval_seqs, eval_every=eval_every)
    shards_dir = os.fspath(shards_dir)
    train_info = check_shards(shards_dir, 'train', seq_len=seq_len)
    heldout_info = check_shards(shards_dir, 'heldout', seq_len=seq_len)
    out_dir = Path(out_dir)
    fingerprint = hashlib.sha256(json.dumps({'settings': asdict(settings), 'shards': _shards_fingerprint(shards_dir)},
                                            sort_keys=True).encode()).hexdigest()
    cached = _load_cached(out_dir, fingerprint)
    if cached is not None:
        return cached

    from transformers import LlamaConfig, LlamaForCausalLM

    from darwinlm_foundry.data.sources import embedded_tokenizer

    tok = tokenizer if tokenizer is not None else embedded_tokenizer()
    try:
        manifest_tok = read_manifest(shards_dir)['tokenizer']
    except FileNotFoundError:
        manifest_tok = None
    if manifest_tok is not None and manifest_tok.get('vocab_size') != len(tok):
        raise ValueError(f'the shards in {shards_dir} were tokenised with {manifest_tok.get("name")!r} '
                         f'(vocab {manifest_tok.get("vocab_size")}), not this tokenizer (vocab {len(tok)}); '
                         'pass the matching tokenizer')
    if train_info['num_samples'] < batch_size:
        raise ValueError(f'the train split has {train_info["num_samples"]} samples, fewer than batch_size={batch_size}')

    t0 = time.time()
    with _quiet():
        from composer.core import Callback as CoreCallback
        from composer.utils import reproducibility

        reproducibility.seed_all(seed)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=settings.intermediate_size,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=max(seq_len, 2048), tie_word_embeddings=True,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5, initializer_range=0.02)
        model = LlamaForCausalLM(config)
        n_eval = min(eval_seqs, heldout_info['num_samples'])
        heldout = sample_sequences(Path(shards_dir) / 'heldout', n_eval, seq_len, seed=seed)
        ppl_before = heldout_perplexity(model, heldout)
        curve = [[0, ppl_before]]
        train_loss: list[float] = []

        class _Curve(CoreCallback):
            """Per-step training loss; held-out perplexity every ``eval_every`` steps and at the end."""

            def batch_end(self, state, logger):
                step = int(state.timestamp.batch)
                train_loss.append(round(float(state.loss), 5))
                if step % eval_every == 0 or step == steps:
                    curve.append([step, heldout_perplexity(state.model.model, heldout)])
                    if verbose:
                        print(f'[pretrain_tiny] step {step}/{steps} loss {train_loss[-1]:.3f} '
                              f'held-out ppl {curve[-1][1]:.1f}', flush=True)

        fit_causal_lm(model, shards_dir, tokenizer=tok, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                      warmup=warmup, seed=seed, device=device, callbacks=[_Curve()])
        model = model.cpu()

    result = PretrainResult(path=str(out_dir), cached=False, ppl_before=ppl_before, ppl_after=curve[-1][1],
                            curve=curve, train_loss=train_loss, seconds=round(time.time() - t0, 2),
                            params=count_parameters(model), settings=asdict(settings))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.staging-', dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        record = {**asdict(result), 'fingerprint': fingerprint}
        record.pop('path'), record.pop('cached')
        (staging / PRETRAIN_RECORD).write_text(json.dumps(record, indent=2) + '\n')
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the model directory should not be
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
