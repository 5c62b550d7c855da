"""Composer ``Trainer`` objects that live for one job inside a long process.

Composer's ``Engine`` registers ``atexit.register(Engine._close, state, logger)`` so that callbacks are closed
when the interpreter exits. That registration holds the ``State`` -- model, optimizer, dataloader -- until
the process ends, even after ``trainer.close()``. A process that runs many fits (the search fine-tunes every
offspring; the reproduction post-trains dozens of models; the chain post-trains in one process beside later
stages) then keeps every model and optimizer it ever trained: ~0.3 GB per level-5 offspring of a 18M-parameter
model, ~1.3 GB (weights + AdamW moments) per SmolLM2 train stage. Saving a checkpoint adds a second holder:
torch's distributed-checkpoint helper ``_get_fqns`` is an unbounded ``functools.cache`` keyed on the model
(torch 2.7), which :func:`close_trainer` empties. A third one comes with the first import of Composer when it
happens inside a function (a lazy import): paramiko, which Composer imports, keeps the error of an optional import
with its traceback, whose frames reach back to that function with its locals (the model, the optimizer); see
:func:`~darwinlm_foundry.utils.memory.drop_module_exception_tracebacks`, which :func:`close_trainer` calls.
"""

from __future__ import annotations

import atexit
import contextlib
import weakref
from typing import Any, Callable, Iterator

__all__ = ['close_trainer', 'transient_trainer', 'weak_engine_atexit']


def _close_if_alive(close: Callable, refs: list) -> None:
    objects = [ref() for ref in refs]
    if all(obj is not None for obj in objects):  # still referenced at exit: close it, as Composer would have
        close(*objects)


@contextlib.contextmanager
def weak_engine_atexit() -> Iterator[None]:
    """Engines created inside the block register their at-exit close on weak references to their state and
    logger: a trainer still alive when the interpreter exits is closed then, as Composer intends, and one that
    was closed and dropped is freed at once instead of at exit."""
    from composer.core.engine import Engine

    register = atexit.register

    def weak_register(func, *args, **kwargs):
        if func is Engine._close and not kwargs:
            register(_close_if_alive, func, [weakref.ref(arg) for arg in args])
            return func
        return register(func, *args, **kwargs)

    atexit.register = weak_register
    try:
        yield
    finally:
        atexit.register = register


def close_trainer(trainer) -> None:
    """Close ``trainer`` and drop the library caches that would keep its model alive after it."""
    trainer.close()
    from torch.distributed.checkpoint import state_dict
    fqns = getattr(state_dict, '_get_fqns', None)
    if hasattr(fqns, 'cache_clear'):  # the cache only saves recomputing names; cleared, it fills again on use
        fqns.cache_clear()
    from darwinlm_foundry.utils.memory import drop_module_exception_tracebacks
    drop_module_exception_tracebacks()


@contextlib.contextmanager
def transient_trainer(**trainer_kwargs: Any):
    """``with transient_trainer(model=..., ...) as trainer: trainer.fit()`` -- a Composer ``Trainer`` that is
    closed when the block ends (also on errors) and then holds nothing: once the caller drops its own
    references, the model, optimizer and dataloader can be freed."""
    from composer import Trainer

    with weak_engine_atexit():
        trainer = Trainer(**trainer_kwargs)
    try:
        yield trainer
    finally:
        close_trainer(trainer)
