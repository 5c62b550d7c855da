"""Swap the Hugging Face module inside a Composer model for its shrunk version, before training starts.

Used at ``Event.INIT`` (before DDP/FSDP wrapping) by the pruning algorithm and the search callback. Optimizer
parameter groups are rebuilt by parameter *name*: a pruned parameter keeps its name and its group (so
per-group settings such as no weight decay on norms survive); a removed unit's parameters leave their group.
"""

from typing import Optional, Sequence

import torch


def _unwrap(composer_model):
    if not hasattr(composer_model, 'model') or not isinstance(composer_model.model, torch.nn.Module):
        raise TypeError(f'{type(composer_model).__name__} does not wrap a Hugging Face model in `.model`; '
                        'use an llm-foundry hf_causal_lm / darwinlm model.')
    return composer_model.model


def swap_hf_model(composer_model, new_model: torch.nn.Module,
                  optimizers: Optional[Sequence[torch.optim.Optimizer]] = None) -> torch.nn.Module:
    """Replace ``composer_model.model`` with ``new_model`` and point ``optimizers`` at its parameters.

    The new model is moved to the old one's device and dtype and takes its train/eval mode. Optimizers must
    not have stepped yet (their state would belong to the old shapes). Returns the old module.
    """
    old = _unwrap(composer_model)
    ref = next(old.parameters())
    new_model.to(device=ref.device, dtype=ref.dtype)
    new_model.train(old.training)
    old_names = {id(p): name for name, p in old.named_parameters()}
    new_params = dict(new_model.named_parameters())
    for opt in optimizers or ():
        if any(len(s) for s in opt.state.values()):
            raise RuntimeError('model surgery after the optimizer has stepped is not supported: apply the pruned '
                               'configuration at Event.INIT, before training.')
        for group in opt.param_groups:
            kept = []
            for p in group['params']:
                name = old_names.get(id(p))
                if name is None:
                    kept.append(p)  # not ours (e.g. an extra head): leave it
                elif name in new_params:
                    kept.append(new_params.pop(name))
            group['params'] = kept
        if new_params and opt.param_groups:
            # Parameters the old model did not have (none for pure pruning) join the first group.
            opt.param_groups[0]['params'].extend(new_params.values())
            new_params = {}
    composer_model.model = new_model
    if hasattr(composer_model, 'config'):
        composer_model.config = new_model.config
    return old
