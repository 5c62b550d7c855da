"""Held-out perplexity and KL(dense || model), the numbers the eval stage reports for every model.

* :func:`heldout_metrics` — perplexity and KL(dense || model) of several models side by side on held-out
  token sequences; :class:`HeldoutReference` the same numbers for many models scored one after another
  against a dense side computed once.
"""

from __future__ import annotations

import os
import shutil
import weakref
from typing import Mapping, Optional

import torch

from darwinlm_foundry.search.fitness import DenseTargets, SpilledTargets, TokenScores, score_tokens
from darwinlm_foundry.utils.io import process_scratch_dir
from darwinlm_foundry.utils.params import count_parameters

__all__ = ['heldout_metrics', 'HeldoutReference']


# ============================================================================ held-out ppl / KL
@torch.no_grad()
def heldout_metrics(models: Mapping[str, torch.nn.Module], dense_name: str, tokens: torch.Tensor,
                    batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Perplexity and KL(dense || model) of each model on held-out ``tokens`` (LongTensor ``n x L``).

    Every position but the last predicts the next token; ppl = exp(mean NLL over those), KL is the mean over
    the same positions of KL(p_dense || p_model) (0 for the dense model itself). Per batch the dense logits are
    computed once, then each model's in turn, scored and dropped before the next (at a 49,152-token vocabulary
    a batch of 8 x 512 tokens has 0.8 GB of logits per model), so the models' order does not change a number.
    Returns ``{name: {'ppl': ..., 'nll': ..., 'kl': ...}}``.
    """
    if dense_name not in models:
        raise ValueError(f'dense model {dense_name!r} is not among the models {list(models)}')
    _check_heldout_tokens(tokens)
    scores = {name: TokenScores() for name in models}
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size]
        dense_logits = _logits(models[dense_name], batch)
        # the positions that predict a token (the last has no next one)
        dense = DenseTargets(logits=dense_logits[:, :-1])
        scores[dense_name].add(dense_logits, batch, dense, last=False)
        for name, model in models.items():
            if name != dense_name:
                scores[name].add(_logits(model, batch), batch, dense, last=False)
        del dense, dense_logits
    return {name: s.means() for name, s in scores.items()}


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch.to(next(model.parameters()).device)).logits.float().cpu()


def _check_heldout_tokens(tokens: torch.Tensor) -> None:
    if tokens.ndim != 2 or tokens.dtype != torch.long or tokens.shape[1] < 2:
        raise ValueError(f'tokens must be a LongTensor (n x L) with L >= 2, got {tuple(tokens.shape)} {tokens.dtype}')


class HeldoutReference:
    """:func:`heldout_metrics` for many models scored one after another: the dense side is computed once.

    Keeps the dense next-token probabilities of every held-out position (fp32, ``n x (L-1) x vocab x 4`` bytes:
    2.8 GB for 22K tokens at Llama-2's 32K vocabulary; 5.2 GB for SmolLM2's 49K vocabulary on 52 x 512 tokens),
    so each model then costs one forward pass and no second dense pass. In memory by default; with
    ``spill_dir`` in files of a private directory made there (removed with this object, or by the next
    reference made in ``spill_dir`` when a killed process left it), read back a batch at a time, bit-identical:
    then a process that keeps the reference through other work (a study scoring models between searches and
    post-trainings) does not hold them. Same definitions and numbers as :func:`heldout_metrics`, which needs
    neither memory nor files for them but repeats the dense pass.
    """

    def __init__(self, dense: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8,
                 spill_dir: Optional[str] = None):
        _check_heldout_tokens(tokens)
        self.tokens, self.batch_size = tokens, batch_size
        self.scratch: Optional[str] = None
        with torch.no_grad():
            blocks = (DenseTargets(logits=_logits(dense, tokens[start:start + batch_size])[:, :-1]).prepare(
                release_logits=True) for start in range(0, len(tokens), batch_size))
            if spill_dir is None:
                self._targets = list(blocks)
            else:
                self.scratch = process_scratch_dir(spill_dir, '.darwinlm_heldout_')
                weakref.finalize(self, shutil.rmtree, self.scratch, True)
                self._targets = SpilledTargets.write_blocks(blocks, os.path.join(self.scratch, 'targets'))

    def _batch_targets(self, start: int, stop: int) -> DenseTargets:
        if isinstance(self._targets, SpilledTargets):
            return self._targets.rows(start, stop)
        return self._targets[start // self.batch_size]

    @torch.no_grad()
    def score(self, model: torch.nn.Module) -> dict[str, float]:
        """``{'ppl', 'nll', 'kl', 'params'}`` of ``model`` on the held-out tokens."""
        model.eval()
        scores = score_tokens(lambda ids: _logits(model, ids), self.tokens, self.batch_size,
                              targets=self._batch_targets, last=False)
        return {**scores.means(), 'params': count_parameters(model)}
