"""The one parameter count of a model in memory: parameters actually stored, a tied embedding / LM head once.

(The closed-form counts from a config are :func:`darwinlm_foundry.structure.shrinking.parameter_count` and, per
level assignment, :meth:`darwinlm_foundry.structure.levels.LevelSpec.parameter_count`.)
"""

__all__ = ['count_parameters']


def count_parameters(model) -> int:
    """Parameters of ``model`` actually stored: tensors that share storage (tied weights) are counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.data_ptr(), p.numel()) if p.numel() else id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total
