"""Data for DarwinLM stages: text sources -> tokenised MDS shards -> checks, loaders and samplers.

* :mod:`.sources`: the embedded text and tokenizer, files / globs / fsspec URIs, JSON-lines and parquet readers;
* :mod:`.shards`: the MDS converter, its splits and manifest, per-source held-out text;
* :mod:`.loaders`: shard checks, llm-foundry's text loader, seeded token samples;
* :mod:`.demo_pretrain`: the tiny dense demo model the `pretrain` stage trains.

The public names of the first three are re-exported here (importing them is cheap: ``streaming`` and
llm-foundry are imported only where shards are written, fetched or loaded).
"""

from darwinlm_foundry.data.loaders import (build_text_loader, check_shards, sample_sequences,
                                           serialized_shm_registration, stop_streaming, text_dataloader_cfg)
from darwinlm_foundry.data.shards import (DEFAULT_SPLITS, MANIFEST_NAME, TOKENS_COLUMN, convert_to_mds, doc_tokens,
                                          pack_documents, read_manifest, split_of, split_texts_by_source)
from darwinlm_foundry.data.sources import (EMBEDDED_SOURCES, embedded_text_files, embedded_tokenizer,
                                           embedded_tokenizer_dir, load_tokenizer, source_name)

__all__ = ['EMBEDDED_SOURCES', 'embedded_text_files', 'embedded_tokenizer', 'embedded_tokenizer_dir', 'load_tokenizer',
           'source_name', 'DEFAULT_SPLITS', 'MANIFEST_NAME', 'TOKENS_COLUMN', 'convert_to_mds', 'doc_tokens',
           'pack_documents', 'read_manifest', 'split_of', 'split_texts_by_source', 'build_text_loader',
           'check_shards', 'sample_sequences', 'serialized_shm_registration', 'stop_streaming', 'text_dataloader_cfg']
