"""Child script of test_shm_registration: N forked processes build a StreamingDataset at the same moment.

Run in a fresh process (fork is safe there: no other threads yet), never inside a pytest worker.
Usage: python _shm_race.py ROOT GUARDED N; prints one JSON list, one entry per process.
"""

import contextlib
import json
import multiprocessing as mp
import sys


def _build(root, guarded, barrier, results):
    from streaming import StreamingDataset

    from darwinlm_foundry.data.loaders import serialized_shm_registration
    barrier.wait()
    try:
        with serialized_shm_registration() if guarded else contextlib.nullcontext():
            ds = StreamingDataset(local=root, split='train', shuffle=False, batch_size=1)
        results.put(['ok', ds._shm_prefix_int, int(ds[3]['tokens'][0])])
        barrier.wait(timeout=60)  # keep every dataset (and its prefix) alive until all are built
    except Exception as err:  # reported to the parent
        results.put(['error', type(err).__name__, repr(err)])
        barrier.abort()


def main(root: str, guarded: bool, n: int) -> list:
    import streaming  # noqa: F401  (imported once, before forking)

    import darwinlm_foundry.data.loaders  # noqa: F401
    ctx = mp.get_context('fork')
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_build, args=(root, guarded, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(60)
    return out


if __name__ == '__main__':
    print(json.dumps(main(sys.argv[1], sys.argv[2] == '1', int(sys.argv[3]))))
