"""Rank helpers every stage and the search share: this process's rank, a barrier, and a one-process job run
on rank 0 while the other ranks wait.

A job is named by a ``'module:function'`` path, so this module needs no registry of jobs and imports nothing of
the package: stages name their own jobs (``run_on_rank_zero('darwinlm_foundry.stages.eval:evaluate_models',
...)``) without an import circle.
"""

import importlib
import json
import os
import subprocess
import sys

__all__ = ['rank', 'world_size', 'barrier', 'resolve', 'run_on_rank_zero']

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


if __name__ == '__main__':
    resolve(sys.argv[1])(**json.loads(sys.argv[2]))
