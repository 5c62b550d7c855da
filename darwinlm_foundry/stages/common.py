"""What every stage kind module shares: where a stage's input model came from."""

from typing import Optional


def base_model(refs) -> Optional[str]:
    """The original dense model a stage's input model came from (recorded by the model / pretrain stage)."""
    model = refs.get('model') or {}
    return model.get('base_model') or model.get('model')
