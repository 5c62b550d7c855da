"""Rank helpers every stage and the search share: this process's rank, a barrier, a one-process job run on
rank 0 while the other ranks wait, and the search's torch.distributed plumbing (broadcast, sum over ranks, and
a block where Composer sees a one-process world).

A job is named by a ``'module:function'`` path, so this module needs no registry of jobs and imports nothing of
the package: stages name their own jobs (``run_on_rank_zero('darwinlm_foundry.stages.eval:evaluate_models',
...)``) without an import circle.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a tensor is summed, not to read a rank
    import torch

__all__ = ['rank', 'world_size', 'barrier', 'resolve', 'run_on_rank_zero', 'torch_world', 'local_rank',
           'broadcast_object', 'sum_over_ranks', 'composer_rank_local']

_DIST_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def rank() -> int:
    from composer.utils import dist
    return dist.get_global_rank()


def world_size() -> int:
    from composer.utils import dist
    return dist.get_world_size()


def barrier() -> None:
    from composer.utils import dist
    dist.barrier()


def resolve(target: str):
    """The function a ``'package.module:function'`` path names."""
    module, _, name = target.partition(':')
    if not module or not name:
        raise ValueError(f'{target!r} is not a "module:function" path')
    return getattr(importlib.import_module(module), name)


def run_on_rank_zero(target: str, kwargs: dict) -> None:
    """Run a one-process job (the function ``target`` names, called with ``kwargs``) on rank 0 while the
    other ranks wait.

    Under several ranks it runs in a fresh process without the launcher's environment: streaming's and
    Composer's own collectives would otherwise wait for ranks that are not taking part.
    """
    if world_size() == 1:
        resolve(target)(**kwargs)
        return
    if rank() == 0:
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        subprocess.run([sys.executable, '-m', 'darwinlm_foundry.utils.dist', target, json.dumps(kwargs)],
                       env=env, check=True)
    barrier()


# --------------------------------------------------------------------------------------------------
# Distributed helpers (torch.distributed directly: Composer's view may be patched, see composer_rank_local)
# --------------------------------------------------------------------------------------------------
def torch_world() -> tuple[int, int]:
    """(rank, world size) as torch.distributed sees it; (0, 1) when it is not initialised."""
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def local_rank() -> int:
    """This process's rank on its node (the launcher's ``LOCAL_RANK``)."""
    return int(os.environ.get('LOCAL_RANK', '0'))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (torch.distributed directly)."""
    import torch.distributed as tdist
    if torch_world()[1] == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 CPU tensor over ranks (exact when each entry comes from one rank, the others zero)."""
    import torch.distributed as tdist
    if torch_world()[1] == 1:
        return values
    backend = tdist.get_backend()
    t = values.to('cuda') if backend == 'nccl' else values
    tdist.all_reduce(t)
    return t.cpu()


class _LocalDist:
    """torch.distributed as Composer sees it inside :func:`composer_rank_local`: not initialised."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def is_initialized() -> bool:
        return False


@contextlib.contextmanager
def composer_rank_local():
    """Within this block Composer sees a one-process world although ``torch.distributed`` is initialised.

    Used for the rank-local fits of ``offspring_parallel`` mode: a Composer ``Trainer`` built here does no
    DDP wrapping, uses no distributed sampler and runs no collective (its seed broadcast, barriers and
    metric syncs all become single-process no-ops), so ranks can run different numbers of fits on different
    models. The engine's own collectives use ``torch.distributed`` directly and are unaffected. Pass the
    device to the Trainer explicitly (``DeviceGPU(device_id=local_rank)``): Composer's default would be
    ``cuda:0`` on every rank here.
    """
    import composer.utils.dist as cdist
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or isinstance(cdist.dist, _LocalDist):
        yield
        return
    env = {'WORLD_SIZE': '1', 'RANK': '0', 'LOCAL_WORLD_SIZE': '1', 'LOCAL_RANK': '0', 'NODE_RANK': '0'}
    saved_env = {k: os.environ.get(k) for k in env}
    saved = cdist.dist
    cdist.dist = _LocalDist(saved)
    os.environ.update(env)
    try:
        yield
    finally:
        cdist.dist = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == '__main__':
    resolve(sys.argv[1])(**json.loads(sys.argv[2]))
