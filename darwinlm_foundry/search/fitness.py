"""Fitness of a candidate model: KL divergence to the dense model, its top-k approximation, perplexity (exp of
the mean :func:`token_nll`).

All functions take logits whose last dimension is the vocabulary and whose position ``t`` is the
next-token distribution after token ``t`` (the model's output as is; shift the labels, not the logits,
see :func:`next_token_labels`). Softmaxes run in fp32 over chunks of tokens so that a (tokens x vocab)
fp32 copy of the whole batch is never materialised.

:class:`TokenScores` / :func:`score_tokens` are the one loop that turns a model's logits into summed NLL and
KL over batches: the search's fitness and probe (``search/candidates.py``) and the held-out ppl / KL
(``eval/heldout.py``, which the eval stage and ``bench/reproduce.py`` use) all run through it.

:class:`DenseLogitCache` computes the dense model's targets once per calibration sample and keeps them in
memory or memory-mapped on disk, so the dense model need not stay resident during the search.

Torch + numpy only (no Composer).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from darwinlm_foundry.utils.io import atomic_write_bytes

__all__ = [
    'kl_divergence',
    'topk_kl',
    'token_nll',
    'TokenScores',
    'score_tokens',
    'next_token_labels',
    'DenseTargets',
    'DenseLogitCache',
    'prepare_logits',
    'SpilledTargets',
]

_REDUCTIONS = ('mean', 'sum', 'none')
_DEFAULT_CHUNK = 2048
_PREPARED_CHUNK = 64  # tokens per step of the prepared KL
_HEAD_CHUNK = 256  # tokens per LM-head matmul of DenseTargets.kl_hidden (a 50 MB block for a 49152 vocabulary)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}')


def _flat_mask(mask: Optional[torch.Tensor], token_shape: torch.Size, n: int, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(f'mask has shape {tuple(mask.shape)}, expected the token shape {tuple(token_shape)}')
    return mask.reshape(n).to(device=device, dtype=torch.bool)


def _reduce(per_token: torch.Tensor, flat_mask: Optional[torch.Tensor], token_shape, reduction: str):
    """per_token: (N,) float64 with masked-out tokens already zero."""
    if reduction == 'none':
        return per_token.to(torch.float32).reshape(token_shape)
    total = per_token.sum()
    if reduction == 'sum':
        return total.to(torch.float32)
    count = per_token.numel() if flat_mask is None else int(flat_mask.sum())
    if count == 0:
        raise ValueError('the mask selects no tokens; nothing to average over')
    return (total / count).to(torch.float32)


def kl_divergence(dense_logits: torch.Tensor, student_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  reduction: str = 'mean', chunk_size: int = _DEFAULT_CHUNK) -> torch.Tensor:
    """KL(p_dense || p_student) of the next-token distributions, per token, reduced over tokens.

    ``dense_logits`` and ``student_logits``: same shape ``(..., vocab)``, any float dtype. ``mask``
    (shape ``(...)``, bool): tokens to include. ``reduction``: ``'mean'`` over included tokens (the fitness),
    ``'sum'`` (to accumulate over batches), or ``'none'`` (per token, zero where masked out).
    Computed in fp32 log-space, ``chunk_size`` tokens at a time; differentiable.
    """
    _check_reduction(reduction)
    if dense_logits.shape != student_logits.shape:
        raise ValueError(f'dense logits {tuple(dense_logits.shape)} and student logits '
                         f'{tuple(student_logits.shape)} must have the same shape')
    vocab = student_logits.shape[-1]
    token_shape = student_logits.shape[:-1]
    dense = dense_logits.reshape(-1, vocab)
    student = student_logits.reshape(-1, vocab)
    n = student.shape[0]
    device = student.device
    fmask = _flat_mask(mask, token_shape, n, device)
    pieces = []
    for i in range(0, n, chunk_size):
        log_p = dense[i:i + chunk_size].to(device=device, dtype=torch.float32).log_softmax(-1)
        log_q = student[i:i + chunk_size].float().log_softmax(-1)
        p = log_p.exp()
        # p == 0 (e.g. a -inf dense logit) contributes 0, not 0 * inf = nan.
        kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
        pieces.append(kl.double())
    per_token = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64, device=device)
    if fmask is not None:
        per_token = torch.where(fmask, per_token, torch.zeros_like(per_token))
    return _reduce(per_token, fmask, token_shape, reduction)


def topk_kl(dense_topk_values: torch.Tensor, dense_topk_indices: torch.Tensor, student_logits: torch.Tensor,
            dense_logsumexp: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
            reduction: str = 'mean', chunk_size: int = _DEFAULT_CHUNK) -> torch.Tensor:
    """Top-k approximation of KL(p_dense || p_student) for large vocabularies.

    The dense distribution of each token is stored as its k largest logits ``dense_topk_values`` (shape
    ``(..., k)``) at distinct vocabulary ids ``dense_topk_indices`` (``(..., k)``, int) and the log-sum-exp of
    all its logits ``dense_logsumexp`` (``(...)``); pass ``dense_logsumexp=None`` when the values already are
    log-probabilities. With ``a_i = value_i - logsumexp`` (the dense log-probability of token ``i``),
    ``p_i = exp(a_i)``, and the dense mass outside the top k lumped into one bucket, ``r = 1 - sum_i p_i``,
    the student is coarsened the same way: ``b_i = log q(token_i)`` from its full log-softmax and
    ``q_rest = 1 - sum_i exp(b_i)`` (computed as the log-sum-exp of the student's other logits, no
    cancellation). The value is the exact KL between the two (k+1)-outcome distributions::

        sum_i p_i (a_i - b_i) + r (log r - log q_rest)

    Coarsening never increases a KL divergence, so this is a lower bound of the full KL that grows with k
    and equals it at k = vocab (where r = 0). The research code's ``sparse_kl`` instead renormalises both
    distributions over the dense top-k ids and ignores the rest. Arguments ``mask``/``reduction`` as in
    :func:`kl_divergence`.
    """
    _check_reduction(reduction)
    vocab = student_logits.shape[-1]
    token_shape = student_logits.shape[:-1]
    k = dense_topk_values.shape[-1]
    if dense_topk_values.shape != dense_topk_indices.shape or dense_topk_values.shape[:-1] != token_shape:
        raise ValueError(f'top-k values {tuple(dense_topk_values.shape)} and indices '
                         f'{tuple(dense_topk_indices.shape)} must both have shape {tuple(token_shape)} + (k,)')
    if not 0 < k <= vocab:
        raise ValueError(f'k={k} must lie in 1..vocab={vocab}')
    if dense_logsumexp is not None and dense_logsumexp.shape != token_shape:
        raise ValueError(f'dense_logsumexp has shape {tuple(dense_logsumexp.shape)}, '
                         f'expected {tuple(token_shape)}')
    student = student_logits.reshape(-1, vocab)
    n = student.shape[0]
    device = student.device
    values = dense_topk_values.reshape(n, k)
    indices = dense_topk_indices.reshape(n, k)
    lse = None if dense_logsumexp is None else dense_logsumexp.reshape(n)
    fmask = _flat_mask(mask, token_shape, n, device)
    full_cover = k == vocab  # the top-k is the whole vocabulary: no remaining bucket
    tiny_log = float(np.log(np.finfo(np.float32).tiny))
    pieces = []
    for i in range(0, n, chunk_size):
        sl = slice(i, i + chunk_size)
        a = values[sl].to(device=device, dtype=torch.float64)
        if lse is not None:
            a = a - lse[sl].to(device=device, dtype=torch.float64).unsqueeze(-1)
        idx = indices[sl].to(device=device, dtype=torch.long)
        s = student[sl].float()
        s_lse = torch.logsumexp(s, -1)
        b = (s.gather(-1, idx) - s_lse.unsqueeze(-1)).double()
        p = a.exp()
        kl = torch.where(p > 0, p * (a - b), torch.zeros_like(p)).sum(-1)
        if not full_cover:
            log_top = torch.logsumexp(a, -1).clamp(max=0.0)
            r = -torch.expm1(log_top)  # dense mass outside the top k, without 1 - sum cancellation
            rest_logits = s.scatter(-1, idx, float('-inf'))
            log_q_rest = (torch.logsumexp(rest_logits, -1) - s_lse).double().clamp(min=tiny_log)
            rest = torch.where(r > 0, r * (torch.log(r.clamp(min=1e-300)) - log_q_rest), torch.zeros_like(r))
            kl = kl + rest
        pieces.append(kl)
    per_token = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64, device=device)
    if fmask is not None:
        per_token = torch.where(fmask, per_token, torch.zeros_like(per_token))
    return _reduce(per_token, fmask, token_shape, reduction)


def next_token_labels(input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels aligned with the logits of ``input_ids``: ``labels[..., t] = input_ids[..., t + 1]``.

    The last position has no next token and gets ``ignore_index``.
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[..., :-1] = input_ids[..., 1:]
    return labels


def token_nll(student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
              reduction: str = 'mean', chunk_size: int = _DEFAULT_CHUNK) -> torch.Tensor:
    """Negative log-likelihood of ``labels`` (aligned with the logits, see :func:`next_token_labels`).

    Positions whose label is ``ignore_index`` are left out. fp32, chunked; reductions as in
    :func:`kl_divergence`.
    """
    _check_reduction(reduction)
    vocab = student_logits.shape[-1]
    token_shape = student_logits.shape[:-1]
    if tuple(labels.shape) != tuple(token_shape):
        raise ValueError(f'labels have shape {tuple(labels.shape)}, expected {tuple(token_shape)}')
    student = student_logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1).to(student.device)
    keep = flat_labels != ignore_index
    pieces = []
    for i in range(0, student.shape[0], chunk_size):
        pieces.append(F.cross_entropy(student[i:i + chunk_size].float(), flat_labels[i:i + chunk_size],
                                      ignore_index=ignore_index, reduction='none').double())
    per_token = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64, device=student.device)
    return _reduce(per_token, keep, token_shape, reduction)


# --------------------------------------------------------------------------------------------------
# The token-scoring loop: search fitness, probe, held-out ppl / KL (and the bench scripts through them)
# --------------------------------------------------------------------------------------------------
@dataclass
class TokenScores:
    """Running sums of next-token NLL and KL(dense || model) over batches, and the tokens each counts.

    :meth:`add` scores one batch; :func:`score_tokens` runs a model over a token tensor batch by batch. Every
    caller that turns logits into NLL / KL goes through :meth:`add`, so the search's fitness, its probe and the
    held-out numbers are the same arithmetic.
    """

    nll: float = 0.0
    nll_tokens: int = 0
    kl: float = 0.0
    kl_tokens: int = 0

    def add(self, logits: torch.Tensor, ids: torch.Tensor, targets: Optional['DenseTargets'] = None,
            nll: bool = True, last: bool = True) -> 'TokenScores':
        """Add the batch ``ids`` (``(n, L)``) with the model's ``logits`` (``(n, L, vocab)``).

        ``nll``: add the NLL of every next token (the last position has none). ``targets``: the dense
        model's :class:`DenseTargets` for the scored positions; adds KL(dense || model). ``last``: score the
        last position's KL too (the search's targets cover all ``L`` positions); ``False`` scores positions
        ``0 .. L-2`` only (the held-out numbers: the positions that predict a token), with ``targets`` of that
        length."""
        if not last:
            logits, labels = logits[..., :-1, :], ids[..., 1:]
        else:
            labels = next_token_labels(ids)
        if nll:
            self.nll += float(token_nll(logits, labels, reduction='sum'))
            self.nll_tokens += int((labels != -100).sum())
        if targets is not None:
            self.kl += float(targets.kl(logits, reduction='sum'))
            self.kl_tokens += logits[..., 0].numel()
        return self

    def sums(self, metric: str) -> tuple[float, int]:
        """(sum, tokens) of ``'ppl'`` (the NLL) or of the KL (any other fitness)."""
        return (self.nll, self.nll_tokens) if metric == 'ppl' else (self.kl, self.kl_tokens)

    def means(self) -> dict[str, float]:
        """``{'ppl', 'nll', 'kl'}`` per counted token (the held-out numbers)."""
        nll = self.nll / self.nll_tokens
        return {'ppl': math.exp(nll), 'nll': nll, 'kl': self.kl / self.kl_tokens}


@torch.no_grad()
def score_tokens(forward: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, batch_size: int,
                 targets: Optional[Callable[[int, int], 'DenseTargets']] = None, nll: bool = True,
                 last: bool = True, head_weight: Optional[torch.Tensor] = None) -> TokenScores:
    """:class:`TokenScores` of a model over ``tokens`` (``(n, L)``), ``batch_size`` rows at a time.

    ``forward(ids)``: the model's logits for a batch of rows (moved to its device by the caller's function;
    cast to fp32 here). ``targets(start, stop)``: the dense targets of rows ``start:stop`` (e.g.
    ``DenseTargets.rows``), or ``None`` for no KL. ``nll`` / ``last`` as in :meth:`TokenScores.add`.
    ``head_weight``: ``forward`` returns the final hidden states instead and this (bias-free) LM head is applied
    here; a KL-only score over all positions then runs it fused with the KL (:meth:`DenseTargets.kl_hidden`,
    same values)."""
    scores = TokenScores()
    for i in range(0, len(tokens), batch_size):
        ids = tokens[i:i + batch_size]
        out = forward(ids)
        batch_targets = None if targets is None else targets(i, i + batch_size)
        if head_weight is not None:
            if batch_targets is not None and not nll and last:
                scores.kl += float(batch_targets.kl_hidden(out, head_weight, reduction='sum'))
                scores.kl_tokens += out[..., 0].numel()
                continue
            out = F.linear(out, head_weight)
        scores.add(out.float(), ids, batch_targets, nll=nll, last=last)
    return scores


# --------------------------------------------------------------------------------------------------
# Dense targets, cached
# --------------------------------------------------------------------------------------------------
@dataclass
class DenseTargets:
    """The dense model's targets for one sample: full ``logits`` or the top-k triple.

    Top-k form: ``topk_values`` (raw logits, ``(..., k)``), ``topk_indices`` (``(..., k)``) and
    ``logsumexp`` (``(...)``), as :func:`topk_kl` takes them.
    """

    logits: Optional[torch.Tensor] = None
    topk_values: Optional[torch.Tensor] = None
    topk_indices: Optional[torch.Tensor] = None
    logsumexp: Optional[torch.Tensor] = None

    _FIELDS = ('logits', 'topk_values', 'topk_indices', 'logsumexp')

    def __post_init__(self):
        self._prepared: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def is_topk(self) -> bool:
        return self.topk_values is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._FIELDS if getattr(self, k) is not None}

    @property
    def nbytes(self) -> int:
        tensors = list(self.tensors().values()) + list(self._prepared or ())
        return sum(t.numel() * t.element_size() for t in tensors)

    def prepare(self, release_logits: bool = False) -> 'DenseTargets':
        """Compute (once) and keep the dense side of the KL for the full form: ``p`` (fp32) and, per token,
        ``sum p log p`` (fp64). Every later :meth:`kl` is then a row-wise dot product and a logsumexp over the
        student's logits instead of two normalisations (the search scores many candidates against the same
        targets). Doubles the memory unless ``release_logits`` (then only the prepared side stays: :meth:`kl`
        and :meth:`rows` work, :meth:`tensors` is empty); a no-op for the top-k form. Computed a few tokens
        at a time (:func:`prepare_logits`), so the temporaries stay small."""
        if not self.is_topk and self._prepared is None:
            self._prepared = prepare_logits(self.logits)
        if release_logits and self._prepared is not None:
            self.logits = None
        return self

    @classmethod
    def from_prepared(cls, probs: torch.Tensor, neg_entropy: torch.Tensor) -> 'DenseTargets':
        """Targets holding only the prepared side (``p`` and ``sum p log p``, see :meth:`prepare`)."""
        if tuple(probs.shape[:-1]) != tuple(neg_entropy.shape):
            raise ValueError(f'probs {tuple(probs.shape)} and neg_entropy {tuple(neg_entropy.shape)} disagree')
        targets = cls()
        targets._prepared = (probs, neg_entropy)
        return targets

    @property
    def is_prepared(self) -> bool:
        return self._prepared is not None

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """What a cache writes: the logits / top-k form, or the prepared side when that is all there is."""
        tensors = self.tensors()
        if not tensors and self._prepared is not None:
            return dict(zip(_PREPARED_FIELDS, self._prepared))
        return tensors

    def rows(self, start: int, stop: int) -> 'DenseTargets':
        """Rows ``start:stop`` (first dimension = sequences), prepared tensors included."""
        part = DenseTargets(**{k: v[start:stop] for k, v in self.tensors().items()})
        if self._prepared is not None:
            part._prepared = tuple(t[start:stop] for t in self._prepared)
        return part

    def kl(self, student_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
           reduction: str = 'mean') -> torch.Tensor:
        """KL(dense || student): exact for full logits, :func:`topk_kl` for the top-k form."""
        if self.is_topk:
            return topk_kl(self.topk_values, self.topk_indices, student_logits, self.logsumexp,
                           mask=mask, reduction=reduction)
        if self._prepared is not None:
            return _kl_prepared(*self._prepared, student_logits, mask=mask, reduction=reduction)
        return kl_divergence(self.logits, student_logits, mask=mask, reduction=reduction)

    def kl_hidden(self, hidden: torch.Tensor, head_weight: torch.Tensor, reduction: str = 'mean') -> torch.Tensor:
        """:meth:`kl` of the logits ``F.linear(hidden, head_weight)`` (``hidden``: the final hidden states
        ``(..., hidden_size)``, ``head_weight``: the LM head's ``(vocab, hidden_size)``, no bias). With prepared
        targets the head runs a few tokens at a time, fused with the KL, so the logits of a whole batch (for a
        49152-token vocabulary 0.4 GB per 2048 tokens, freshly allocated every batch) never exist; the values are
        those of :meth:`kl` (the head's matmul and every KL step are row-wise)."""
        if self._prepared is None or self.is_topk:
            return self.kl(F.linear(hidden, head_weight), reduction=reduction)
        p, neg_entropy = self._prepared
        vocab = head_weight.shape[0]
        if tuple(p.shape) != tuple(hidden.shape[:-1]) + (vocab,):
            raise ValueError(f'dense targets {tuple(p.shape)} do not match hidden states {tuple(hidden.shape)} '
                             f'and an LM head of {vocab} outputs')
        flat, p, neg_entropy = hidden.reshape(-1, hidden.shape[-1]), p.reshape(-1, vocab), neg_entropy.reshape(-1)
        pieces = []
        for i in range(0, flat.shape[0], _HEAD_CHUNK):
            logits = F.linear(flat[i:i + _HEAD_CHUNK], head_weight)
            pieces.append(_kl_prepared_rows(p[i:i + _HEAD_CHUNK], neg_entropy[i:i + _HEAD_CHUNK],
                                            lambda a, b: logits[a:b], logits.shape[0], logits.device,
                                            logits.shape[:-1], None, 'none', _PREPARED_CHUNK, unreduced=True))
        return _reduce(torch.cat(pieces), None, hidden.shape[:-1], reduction)


def _kl_prepared(p: torch.Tensor, neg_entropy: torch.Tensor, student_logits: torch.Tensor,
                 mask: Optional[torch.Tensor] = None, reduction: str = 'mean',
                 chunk_size: int = _PREPARED_CHUNK) -> torch.Tensor:
    """:func:`kl_divergence` from the dense side prepared by :meth:`DenseTargets.prepare`: per token
    ``sum p log p - sum p s + logsumexp(s)`` with ``s`` the student logits (``sum p = 1``), so the student is
    never normalised over the vocabulary (3-4x faster on a CPU)."""
    if p.shape != student_logits.shape:
        raise ValueError(f'dense targets {tuple(p.shape)} and student logits {tuple(student_logits.shape)} '
                         'must have the same shape')
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    return _kl_prepared_rows(p, neg_entropy, lambda i, j: student[i:j], student.shape[0], student.device,
                             student_logits.shape[:-1], mask, reduction, chunk_size)


def _kl_prepared_rows(p, neg_entropy, logits_rows, n: int, device, token_shape, mask, reduction: str,
                      chunk_size: int, unreduced: bool = False) -> torch.Tensor:
    """The prepared KL with the student's logits of flat tokens ``i:j`` from ``logits_rows(i, j)``, a chunk at a
    time. Every step is row-wise, so the per-token values do not depend on ``chunk_size`` (small chunks keep the
    temporaries in cache instead of several fresh (tokens x vocab) blocks). ``unreduced``: return the fp64
    per-token values unreduced."""
    _check_reduction(reduction)
    vocab = p.shape[-1]
    p, neg_entropy = p.reshape(-1, vocab), neg_entropy.reshape(-1)
    fmask = _flat_mask(mask, token_shape, n, device)
    pieces = []
    for i in range(0, n, chunk_size):
        s = logits_rows(i, i + chunk_size).float()
        # shifted by the row maximum (the KL is unchanged since sum p = 1): the fp32 dot product over raw logits
        # of magnitude 15-20 otherwise rounds to a bias of ~1e-3 per token, visible as KL(dense || dense) > 0
        s = s - s.amax(-1, keepdim=True)
        # fp32 even under autocast (which would run the einsum's bmm in bf16: a 3e-3 relative error per token)
        with torch.autocast(torch.device(device).type, enabled=False):
            cross = torch.einsum('nv,nv->n', p[i:i + chunk_size].to(device), s)
        pieces.append(neg_entropy[i:i + chunk_size].to(device) - cross.double() + s.logsumexp(-1).double())
    per_token = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64, device=device)
    if fmask is not None:
        per_token = torch.where(fmask, per_token, torch.zeros_like(per_token))
    return per_token if unreduced else _reduce(per_token, fmask, token_shape, reduction)


_PREPARED_FIELDS = ('probs', 'neg_entropy')
_PREPARE_CHUNK_TOKENS = 256


def prepare_logits(logits: torch.Tensor, out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                   chunk_tokens: int = _PREPARE_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared dense side of the KL of ``logits`` (``(..., vocab)``, any float dtype): ``p`` (fp32,
    same shape) and ``sum p log p`` per token (fp64, shape ``(...)``), as :meth:`DenseTargets.prepare` keeps it.

    Row-wise (every token on its own), ``chunk_tokens`` tokens at a time, so the temporaries are a few
    ``chunk_tokens x vocab`` blocks instead of several copies of the whole sample; the values are those of
    one pass over the whole tensor. ``out``: preallocated ``(p, neg_entropy)`` to write into (e.g. a slice of a
    larger sample's targets)."""
    vocab = logits.shape[-1]
    token_shape = tuple(logits.shape[:-1])
    if out is None:
        out = (torch.empty(logits.shape, dtype=torch.float32, device=logits.device),
               torch.empty(token_shape, dtype=torch.float64, device=logits.device))
    p_out, ne_out = out
    if tuple(p_out.shape) != tuple(logits.shape) or tuple(ne_out.shape) != token_shape:
        raise ValueError(f'out has shapes {tuple(p_out.shape)}, {tuple(ne_out.shape)}; expected '
                         f'{tuple(logits.shape)}, {token_shape}')
    flat, p_flat, ne_flat = logits.reshape(-1, vocab), p_out.view(-1, vocab), ne_out.view(-1)
    for i in range(0, flat.shape[0], max(1, int(chunk_tokens))):
        log_p = flat[i:i + chunk_tokens].float().log_softmax(-1)
        p = log_p.exp()
        # p == 0 (a -inf dense logit) contributes 0, not 0 * inf = nan
        ne_flat[i:i + chunk_tokens] = torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1, dtype=torch.float64)
        p_flat[i:i + chunk_tokens] = p
    return p_out, ne_out


def _key_json(key: Hashable) -> str:
    try:
        return json.dumps(key, sort_keys=True, separators=(',', ':'))
    except TypeError as err:
        raise TypeError(f'cache key {key!r} must be JSON-serialisable (str, int, tuple/list, dict), '
                        f'e.g. ("fitness", seed, generation, step)') from err


def _tokens_digest(tokens: torch.Tensor) -> str:
    t = tokens.detach().to('cpu').contiguous()
    h = hashlib.sha256(f'{tuple(t.shape)}|{t.dtype}|'.encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to('cpu').contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: store the bits
        return t.view(torch.int16).numpy()
    return t.numpy()


class DenseLogitCache:
    """Dense-model targets per calibration sample, computed once (in memory and/or memory-mapped on disk).

    ``get_or_compute(key, tokens, compute_fn)`` returns the :class:`DenseTargets` of the sample ``key``
    (a JSON-serialisable identity such as ``('fitness', seed, generation, step)``), calling
    ``compute_fn(tokens)`` (the dense model's logits for ``tokens``, or an output with ``.logits``) only the
    first time. ``topk``: store only the top-k form (for 128K vocabularies); ``None`` keeps full logits.
    ``storage_dtype``: dtype of stored logits / top-k values (default fp32; bf16/fp16 halve the size).

    With a ``directory`` every entry is also written there (atomically: temporary file + ``os.replace``,
    metadata last), so a resumed run never recomputes it, and entries beyond ``memory_limit_bytes`` are
    memory-mapped rather than kept resident. Without one, everything stays in memory. A key reused for
    different tokens is an error (the key must identify the sample). Several processes may share a
    directory: they write identical content under the same names.

    Memory: ``prepared=True`` (full form only) stores just the prepared dense side of the KL
    (:meth:`DenseTargets.prepare`: ``p`` fp32 and ``sum p log p`` per token) instead of the logits, i.e. what
    the fitness needs and no more (a cache directory then holds the prepared form too; entries written as
    logits are prepared when read). ``compute_rows``: call ``compute_fn`` on at most this many sequences at a
    time and convert each block to the stored form at once, so the logits of a whole sample (e.g. 8 x 512 x
    49152 fp32 = 0.8 GB) never exist next to their stored form. :meth:`forget` drops an entry no longer needed.
    """

    def __init__(self, directory: Optional[str] = None, topk: Optional[int] = None,
                 memory_limit_bytes: int = 1 << 30, storage_dtype: torch.dtype = torch.float32,
                 prepared: bool = False, compute_rows: Optional[int] = None):
        if topk is not None and topk < 1:
            raise ValueError(f'topk must be >= 1 or None (full logits), got {topk}')
        if storage_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f'storage_dtype must be float32, float16 or bfloat16, got {storage_dtype}')
        self.directory = directory
        self.topk = topk
        self.memory_limit_bytes = int(memory_limit_bytes)
        self.storage_dtype = storage_dtype
        self.prepared = bool(prepared) and topk is None
        if compute_rows is not None and int(compute_rows) < 1:
            raise ValueError(f'compute_rows must be >= 1 or None, got {compute_rows}')
        self.compute_rows = None if compute_rows is None else int(compute_rows)
        self.num_computed = 0  # compute_fn calls, for logging and tests
        self._entries: dict[str, tuple[str, DenseTargets]] = {}  # key json -> (tokens digest, targets)
        self._resident_bytes = 0
        if directory is not None:
            os.makedirs(directory, exist_ok=True)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        key_json = _key_json(key)
        return key_json in self._entries or (self.directory is not None
                                            and os.path.exists(self._meta_path(key_json)))

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    def _stem(self, key_json: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(key_json.encode()).hexdigest()[:32])

    def _meta_path(self, key_json: str) -> str:
        return self._stem(key_json) + '.json'

    def get_or_compute(self, key: Hashable, tokens: torch.Tensor,
                       compute_fn: Callable[[torch.Tensor], Any]) -> DenseTargets:
        """The dense targets of sample ``key`` (tokens ``(..., seq)``), computing them at most once."""
        key_json = _key_json(key)
        digest = _tokens_digest(tokens)
        if key_json in self._entries:
            stored_digest, targets = self._entries[key_json]
            self._check_digest(key, stored_digest, digest)
            return targets
        mapped = False
        if self.directory is not None and os.path.exists(self._meta_path(key_json)):
            targets, mapped = self._load(key, key_json, digest), True
        else:
            targets = self._compute(tokens, compute_fn)
            self.num_computed += 1
            if self.directory is not None:
                self._save(key_json, digest, targets)
                if self._resident_bytes + targets.nbytes > self.memory_limit_bytes:
                    # Too big to keep: drop the in-memory copy, read back through a memory map.
                    targets, mapped = self._load(key, key_json, digest), True
        if not mapped:
            self._resident_bytes += targets.nbytes
        self._entries[key_json] = (digest, targets)
        return targets

    def clear_memory(self) -> None:
        """Forget the in-memory entries (entries on disk stay and are read back on demand)."""
        self._entries.clear()
        self._resident_bytes = 0

    def forget(self, key: Hashable) -> None:
        """Forget the in-memory entry of ``key`` (if any; its copy on disk stays)."""
        entry = self._entries.pop(_key_json(key), None)
        if entry is not None:
            # a memory-mapped entry was never counted; clamp instead of tracking which
            self._resident_bytes = max(0, self._resident_bytes - entry[1].nbytes)

    # -- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _check_digest(key, stored: str, given: str) -> None:
        if stored != given:
            raise ValueError(f'dense-logit cache key {key!r} was stored for different tokens; cache keys must '
                             f'identify the sample (e.g. include seed, generation and step), or clear the cache '
                             f'directory if the data changed')

    @torch.no_grad()
    def _compute(self, tokens: torch.Tensor, compute_fn) -> DenseTargets:
        n = tokens.shape[0] if tokens.dim() > 1 else 1
        rows = self.compute_rows if tokens.dim() > 1 else None
        if rows is None or rows >= n:
            return self.convert(self._logits_of(tokens, compute_fn))
        # block by block into preallocated storage: one block of logits alive at a time
        out: Optional[dict] = None
        for i in range(0, n, rows):
            part = self.convert(self._logits_of(tokens[i:i + rows], compute_fn)).stored_tensors()
            if out is None:
                out = {k: torch.empty((n,) + tuple(v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
            for k, v in part.items():
                out[k][i:i + rows] = v
            del part
        return self._from_stored(out)

    @staticmethod
    def _logits_of(tokens: torch.Tensor, compute_fn) -> torch.Tensor:
        out = compute_fn(tokens)
        logits = getattr(out, 'logits', out)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape[:-1]) != tuple(tokens.shape):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f'compute_fn must return logits of shape {tuple(tokens.shape)} + (vocab,), '
                             f'got {shape}')
        return logits.detach()

    def convert(self, logits: torch.Tensor) -> DenseTargets:
        """Logits to the stored form: (storage-dtype) logits, top-k triple, or the prepared side."""
        if self.topk is None:
            stored = logits.to(self.storage_dtype).cpu()
            if self.prepared:
                return DenseTargets.from_prepared(*prepare_logits(stored))
            return DenseTargets(logits=stored)
        k = min(self.topk, logits.shape[-1])
        full = logits.float()
        values, indices = full.topk(k, dim=-1)
        return DenseTargets(topk_values=values.to(self.storage_dtype).cpu(), topk_indices=indices.cpu(),
                            logsumexp=torch.logsumexp(full, -1).cpu())

    @staticmethod
    def _from_stored(tensors: dict) -> DenseTargets:
        if set(tensors) == set(_PREPARED_FIELDS):
            return DenseTargets.from_prepared(tensors['probs'], tensors['neg_entropy'])
        return DenseTargets(**tensors)

    def _settings(self) -> dict:
        return {'topk': self.topk, 'storage_dtype': str(self.storage_dtype).replace('torch.', '')}

    def _save(self, key_json: str, digest: str, targets: DenseTargets) -> None:
        stem = self._stem(key_json)
        fields = {}
        for name, tensor in targets.stored_tensors().items():
            arr = _to_numpy(tensor)
            atomic_write_bytes(f'{stem}.{name}.npy', lambda f, arr=arr: np.save(f, arr))
            fields[name] = str(tensor.dtype).replace('torch.', '')
        meta = {'key': json.loads(key_json), 'tokens_sha256': digest, 'fields': fields, **self._settings()}
        # Metadata last: its presence means every array is complete.
        atomic_write_bytes(self._meta_path(key_json), lambda f: f.write(json.dumps(meta).encode()))

    def _load(self, key, key_json: str, digest: str) -> DenseTargets:
        meta_path = self._meta_path(key_json)
        try:
            with open(meta_path, encoding='utf-8') as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            raise RuntimeError(f'dense-logit cache metadata {meta_path} is unreadable ({err}); delete it '
                               f'(it will be recomputed) or use another cache directory') from err
        self._check_digest(key, meta.get('tokens_sha256'), digest)
        if {k: meta.get(k) for k in self._settings()} != self._settings():
            raise ValueError(f'dense-logit cache entry {meta_path} was written with settings '
                             f'{ {k: meta.get(k) for k in self._settings()} }, this cache uses {self._settings()}; '
                             f'use another cache directory for different settings')
        stem = self._stem(key_json)
        tensors = {}
        for name, dtype_name in meta['fields'].items():
            # 'c' (copy-on-write) maps the file lazily and gives a writable array torch accepts.
            try:
                arr = np.load(f'{stem}.{name}.npy', mmap_mode='c')
            except (OSError, ValueError) as err:
                raise RuntimeError(f'dense-logit cache file {stem}.{name}.npy is missing or unreadable ({err}); '
                                   f'delete {meta_path} (the entry will be recomputed) or use another cache '
                                   f'directory') from err
            tensor = torch.from_numpy(arr)
            if dtype_name == 'bfloat16':
                tensor = tensor.view(torch.bfloat16)
            tensors[name] = tensor
        if set(tensors) == set(_PREPARED_FIELDS):
            if not self.prepared:
                raise ValueError(f'dense-logit cache entry {meta_path} holds prepared targets (probabilities), '
                                 f'this cache stores logits; use another cache directory')
            return DenseTargets.from_prepared(tensors['probs'], tensors['neg_entropy'])
        targets = DenseTargets(**tensors)
        if self.prepared and not targets.is_topk:
            targets.prepare(release_logits=True)  # an entry written as logits (by an older version)
        return targets


class SpilledTargets:
    """Dense targets written to plain files and read back a block of rows at a time (:meth:`rows`).

    For targets needed rarely but over a long time (the search's fixed probe sample, scored once per
    generation): between uses they cost no memory, and a read is an ordinary file read into a fresh tensor,
    never a memory map (whose touched pages would count as this process's resident memory for as long as
    the map lives). ``write(targets, stem)`` stores :meth:`DenseTargets.stored_tensors` as ``<stem>.<field>.bin``;
    values read back are bit-identical to the ones written.
    """

    def __init__(self, stem: str, fields: dict):
        self.stem = stem
        self.fields = fields  # name -> (torch dtype, shape)

    @classmethod
    def write(cls, targets: DenseTargets, stem: str) -> 'SpilledTargets':
        """Write ``targets`` (in memory) to ``<stem>.<field>.bin``."""
        return cls.write_blocks([targets], stem)

    @classmethod
    def write_blocks(cls, blocks, stem: str) -> 'SpilledTargets':
        """Write consecutive row blocks (:class:`DenseTargets` of the same form, e.g. one per micro-batch as the
        dense model produces them) one after the other: only one block is ever in memory."""
        fields: dict = {}
        files: dict = {}
        try:
            for block in blocks:
                for name, tensor in block.stored_tensors().items():
                    if name not in files:
                        files[name] = open(f'{stem}.{name}.bin', 'wb')
                        fields[name] = (tensor.dtype, (0,) + tuple(tensor.shape[1:]))
                    dtype, shape = fields[name]
                    if tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:]:
                        raise ValueError(f'block field {name}: {tensor.dtype} {tuple(tensor.shape)} does not '
                                         f'continue {dtype} {shape}')
                    _to_numpy(tensor).tofile(files[name])
                    fields[name] = (dtype, (shape[0] + tensor.shape[0],) + shape[1:])
        finally:
            for f in files.values():
                f.close()
        if not fields:
            raise ValueError('no blocks to write')
        return cls(stem, fields)

    @property
    def nbytes(self) -> int:
        return 0  # nothing resident

    def __len__(self) -> int:
        return next(iter(self.fields.values()))[1][0]

    def rows(self, start: int, stop: int) -> DenseTargets:
        """Rows ``start:stop`` (first dimension = sequences) as in-memory :class:`DenseTargets`."""
        n = len(self)
        start, stop = max(0, min(start, n)), max(0, min(stop, n))
        tensors = {}
        for name, (dtype, shape) in self.fields.items():
            per_row = int(np.prod(shape[1:], dtype=np.int64))
            np_dtype = np.dtype(np.int16) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
            arr = np.fromfile(f'{self.stem}.{name}.bin', dtype=np_dtype, count=(stop - start) * per_row,
                              offset=start * per_row * np_dtype.itemsize)
            tensor = torch.from_numpy(arr).reshape((stop - start,) + tuple(shape[1:]))
            tensors[name] = tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor
        if set(tensors) == set(_PREPARED_FIELDS):
            return DenseTargets.from_prepared(tensors['probs'], tensors['neg_entropy'])
        return DenseTargets(**tensors)
