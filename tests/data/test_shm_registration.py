"""Concurrent StreamingDatasets on one node: distinct shared-memory prefixes under the package's lock.

streaming picks its shared-memory prefix by probing ``/dev/shm``; processes that probe together collide
(``FileExistsError``). Four processes forked from one fresh process and released by one barrier
(``_shm_race.py``) reproduce it every time here: ``python tests/data/_shm_race.py <split root> 0 4`` (unguarded)
reports FileExistsError. That control is not a test: its unguarded datasets would collide with other test
workers' datasets.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RACE = Path(__file__).with_name('_shm_race.py')


def _race(root, guarded, n=4):
    proc = subprocess.run([sys.executable, str(RACE), root, '1' if guarded else '0', str(n)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def test_a_stuck_lock_is_skipped_after_the_timeout(split_root):
    """A holder that hangs must not block every later job: after ``timeout`` the dataset is built anyway."""
    import fcntl
    import time

    from streaming import StreamingDataset

    from darwinlm_foundry.data.loaders import _shm_lock_path, serialized_shm_registration
    with open(_shm_lock_path(), 'a+') as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # this process plays the hung holder (flock is per open file)
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match='stayed locked'), serialized_shm_registration(timeout=0.5):
            ds = StreamingDataset(local=split_root, split='train', shuffle=False, batch_size=1)
        waited = time.monotonic() - t0
        fcntl.flock(held, fcntl.LOCK_UN)
    assert 0.5 <= waited < 30 and int(ds[2]['tokens'][0]) == 2
