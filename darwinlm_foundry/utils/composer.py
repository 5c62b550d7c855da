"""Composer ``Trainer`` objects that live for one short job inside a long process.

Composer's ``Engine`` registers ``atexit.register(Engine._close, state, logger)`` so that callbacks are closed
when the interpreter exits. That registration holds the ``State`` -- model, optimizer, dataloader -- until
the process ends, even after ``trainer.close()``. A process that runs many short fits (the search fine-tunes
every offspring; the reproduction post-trains dozens of models) then keeps every model it ever trained:
~0.3 GB per level-5 offspring of a 18M-parameter model, an out-of-memory kill after a few hundred fits.
"""

from __future__ import annotations

import atexit
import contextlib
from typing import Any, Iterator

__all__ = ['transient_trainer']


@contextlib.contextmanager
def _without_engine_atexit() -> Iterator[None]:
    from composer.core.engine import Engine

    register = atexit.register

    def skip_engine_close(func, *args, **kwargs):
        if func is Engine._close:  # closed explicitly by transient_trainer instead
            return func
        return register(func, *args, **kwargs)

    atexit.register = skip_engine_close
    try:
        yield
    finally:
        atexit.register = register


@contextlib.contextmanager
def transient_trainer(**trainer_kwargs: Any):
    """``with transient_trainer(model=..., ...) as trainer: trainer.fit()`` -- a Composer ``Trainer`` that is
    closed when the block ends (also on errors) and then holds nothing: once the caller drops its own
    references, the model, optimizer and dataloader can be freed."""
    from composer import Trainer

    with _without_engine_atexit():
        trainer = Trainer(**trainer_kwargs)
    try:
        yield trainer
    finally:
        trainer.close()
