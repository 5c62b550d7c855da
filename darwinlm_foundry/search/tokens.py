"""Where the search's tokens come from: seeded samples of an MDS split or of an in-memory tensor, and the
per-purpose seeds they are drawn with."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Union

import torch

__all__ = ['TokenSource', 'ShardTokens', 'TensorTokens', 'derive_seed']


class TokenSource:
    """Seeded samples of token sequences: ``sample(n_seqs, seq_len, seed) -> LongTensor (n_seqs, seq_len)``."""

    def sample(self, n_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON identity of the data (fingerprinted with the settings)."""
        raise NotImplementedError


class ShardTokens(TokenSource):
    """Samples of a local MDS split (e.g. the converter's ``search`` split) via :func:`data.sample_sequences`;
    ``by_source``: balanced over the conversion's source files (checked here, before any compute)."""

    def __init__(self, split_dir: Union[str, os.PathLike], by_source: bool = False):
        self.split_dir = os.fspath(split_dir)
        self.by_source = bool(by_source)
        if not os.path.isfile(os.path.join(self.split_dir, 'index.json')):
            raise FileNotFoundError(f'{self.split_dir} is not an MDS split (no index.json); point the search at '
                                    f'the search split written by data.convert_to_mds, e.g. <shards>/search')
        if self.by_source:
            from darwinlm_foundry.data.loaders import source_rows
            source_rows(self.split_dir)  # raises, naming the fix, when the manifest has no source ranges

    def sample(self, n_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
        from darwinlm_foundry.data.loaders import sample_sequences
        return sample_sequences(self.split_dir, n_seqs, seq_len, seed=seed, by_source=self.by_source)

    def describe(self) -> dict:
        with open(os.path.join(self.split_dir, 'index.json'), 'rb') as f:
            out = {'shards': hashlib.sha256(f.read()).hexdigest()}
        if self.by_source:  # recorded only when set: states written before the option existed resume
            out['by_source'] = True
        return out


class TensorTokens(TokenSource):
    """Samples (rows, without replacement, seeded permutation) of an in-memory ``(N, L)`` token tensor."""

    def __init__(self, tokens: torch.Tensor):
        if tokens.dim() != 2:
            raise ValueError(f'tokens must be a (sequences, length) tensor, got shape {tuple(tokens.shape)}')
        self.tokens = tokens.long()

    def sample(self, n_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
        n, length = self.tokens.shape
        if n_seqs > n or seq_len > length:
            raise ValueError(f'asked for {n_seqs} x {seq_len} tokens but the source holds {n} x {length}; lower '
                             f'the token budgets / seq_len or give more data')
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_seqs]
        return self.tokens[perm, :seq_len].clone()

    def describe(self) -> dict:
        t = self.tokens.contiguous()
        return {'tensor': hashlib.sha256(t.numpy().tobytes()).hexdigest(), 'shape': list(t.shape)}


def derive_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed from ``seed`` and a path of names / numbers (independent streams per purpose)."""
    text = json.dumps([seed, *parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], 'little') & 0x7FFFFFFF
