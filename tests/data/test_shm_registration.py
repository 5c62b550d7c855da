"""Concurrent StreamingDatasets on one node: distinct shared-memory prefixes under the package's lock.

streaming picks its shared-memory prefix by probing ``/dev/shm``; processes that probe together collide
(``FileExistsError``). Four forked processes released by one barrier reproduce it every time here.
"""

import multiprocessing as mp

import numpy as np
import pytest


def _build(root, guarded, barrier, results):
    from streaming import StreamingDataset

    from darwinlm_foundry.data.loaders import serialized_shm_registration
    barrier.wait()
    try:
        if guarded:
            with serialized_shm_registration():
                ds = StreamingDataset(local=root, split='train', shuffle=False, batch_size=1)
        else:
            ds = StreamingDataset(local=root, split='train', shuffle=False, batch_size=1)
        results.put(('ok', ds._shm_prefix_int, int(ds[3]['tokens'][0])))
        barrier.wait(timeout=60)  # keep every dataset (and its prefix) alive until all are built
    except Exception as err:  # reported to the parent, which asserts on it
        results.put(('error', type(err).__name__, repr(err)))
        barrier.abort()


def _race(root, guarded, n=4):
    ctx = mp.get_context('fork')  # streaming is imported already: children start at once
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_build, args=(root, guarded, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    return out


@pytest.fixture(scope='module')
def split_root(tmp_path_factory):
    from streaming import MDSWriter
    root = tmp_path_factory.mktemp('mds')
    with MDSWriter(out=str(root / 'train'), columns={'tokens': 'ndarray:int32'}) as writer:
        for i in range(4):
            writer.write({'tokens': np.full(8, i, dtype=np.int32)})
    return str(root)


def test_concurrent_datasets_take_distinct_prefixes(split_root):
    out = _race(split_root, guarded=True)
    assert all(r[0] == 'ok' for r in out), out
    assert len({r[1] for r in out}) == len(out)  # one prefix each
    assert all(r[2] == 3 for r in out)  # and each reads its data


def test_unguarded_streaming_still_races(split_root):
    """The control: without the lock the same start collides. If this fails, streaming stopped racing and
    ``serialized_shm_registration`` can go."""
    for _ in range(3):  # it collides at once here; retried so a loaded machine cannot hide the race
        out = _race(split_root, guarded=False)
        if any(r[0] == 'error' and r[1] == 'FileExistsError' for r in out):
            return
    pytest.fail(f'four unguarded StreamingDatasets started together did not collide: {out}')
