"""Held-out perplexity and KL(dense || model), the numbers the eval stage reports for every model.

* :func:`heldout_metrics` — perplexity and KL(dense || model) of several models side by side on held-out
  token sequences; :class:`HeldoutReference` the same numbers for many models scored one after another
  against a dense side computed once.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from darwinlm_foundry.search.fitness import DenseTargets, kl_divergence, next_token_labels, token_nll
from darwinlm_foundry.utils.params import count_parameters

__all__ = ['heldout_metrics', 'HeldoutReference']


# ============================================================================ held-out ppl / KL
@torch.no_grad()
def heldout_metrics(models: Mapping[str, torch.nn.Module], dense_name: str, tokens: torch.Tensor,
                    batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Perplexity and KL(dense || model) of each model on held-out ``tokens`` (LongTensor ``n x L``).

    Every position but the last predicts the next token; ppl = exp(mean NLL over those), KL is the mean over
    the same positions of KL(p_dense || p_model) (0 for the dense model itself). Models run one batch at a
    time on their own device; the dense logits of a batch are computed once and shared.
    Returns ``{name: {'ppl': ..., 'nll': ..., 'kl': ...}}``.
    """
    if dense_name not in models:
        raise ValueError(f'dense model {dense_name!r} is not among the models {list(models)}')
    _check_heldout_tokens(tokens)
    sums = {name: {'nll': 0.0, 'kl': 0.0} for name in models}
    count = 0
    mask = torch.ones(tokens.shape[1], dtype=torch.bool)
    mask[-1] = False  # the last position has no next token
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size]
        labels = next_token_labels(batch)
        bmask = mask.expand_as(batch)
        logits = {}
        for name, model in models.items():
            device = next(model.parameters()).device
            logits[name] = model(batch.to(device)).logits.float().cpu()
        for name in models:
            sums[name]['nll'] += float(token_nll(logits[name], labels, reduction='sum'))
            sums[name]['kl'] += float(kl_divergence(logits[dense_name], logits[name], mask=bmask, reduction='sum'))
        count += int(bmask.sum())
    out = {}
    for name, s in sums.items():
        nll = s['nll'] / count
        out[name] = {'ppl': math.exp(nll), 'nll': nll, 'kl': s['kl'] / count}
    return out


def _check_heldout_tokens(tokens: torch.Tensor) -> None:
    if tokens.ndim != 2 or tokens.dtype != torch.long or tokens.shape[1] < 2:
        raise ValueError(f'tokens must be a LongTensor (n x L) with L >= 2, got {tuple(tokens.shape)} {tokens.dtype}')


class HeldoutReference:
    """:func:`heldout_metrics` for many models scored one after another: the dense side is computed once.

    Keeps the dense next-token probabilities of every held-out position (fp32, ``n x (L-1) x vocab x 4`` bytes:
    2.8 GB for 22K tokens at Llama-2's 32K vocabulary), so each model then costs one forward pass and no
    second dense pass. Same definitions and numbers as :func:`heldout_metrics`; use that one when the
    probabilities do not fit in memory.
    """

    def __init__(self, dense: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8):
        _check_heldout_tokens(tokens)
        self.tokens, self.batch_size = tokens, batch_size
        self._targets = []
        device = next(dense.parameters()).device
        with torch.no_grad():
            for start in range(0, len(tokens), batch_size):
                logits = dense(tokens[start:start + batch_size].to(device)).logits.float().cpu()[:, :-1]
                self._targets.append(DenseTargets(logits=logits).prepare(release_logits=True))

    @torch.no_grad()
    def score(self, model: torch.nn.Module) -> dict[str, float]:
        """``{'ppl', 'nll', 'kl', 'params'}`` of ``model`` on the held-out tokens."""
        model.eval()
        device = next(model.parameters()).device
        nll = kl = 0.0
        count = 0
        for targets, start in zip(self._targets, range(0, len(self.tokens), self.batch_size)):
            batch = self.tokens[start:start + self.batch_size]
            logits = model(batch.to(device)).logits.float().cpu()[:, :-1]
            nll += float(token_nll(logits, batch[:, 1:], reduction='sum'))
            kl += float(targets.kl(logits, reduction='sum'))
            count += batch[:, 1:].numel()
        return {'ppl': math.exp(nll / count), 'nll': nll / count, 'kl': kl / count,
                'params': count_parameters(model)}
