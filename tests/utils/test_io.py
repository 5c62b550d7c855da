import os
import subprocess
import sys

from darwinlm_foundry.utils.io import process_scratch_dir


def test_process_scratch_dir_removes_only_what_dead_processes_of_this_host_left(tmp_path):
    """A killed search leaves its scratch directory; the next one removes it, but never the scratch of a live
    process, of another host, or anything else in the directory."""
    prefix = '.darwinlm_targets_'
    first = os.path.basename(process_scratch_dir(tmp_path, prefix))
    mine = f'-{os.getpid()}-'
    assert first.startswith(prefix) and mine in first
    host = first[len(prefix):first.index(mine)]  # this host's name as the directory names spell it
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f'{prefix}{host}-{dead_pid}-abc'
    live = tmp_path / f'{prefix}{host}-{os.getppid()}-abc'  # the parent process is alive
    other_host = tmp_path / f'{prefix}otherhost-{dead_pid}-abc'
    unrelated = tmp_path / 'search_state.json'
    for d in (stale, live, other_host):
        d.mkdir()
        (d / 'probe.probs.bin').write_bytes(b'x')
    unrelated.write_text('{}')

    new = process_scratch_dir(tmp_path, prefix)

    assert os.path.basename(new).startswith(f'{prefix}{host}{mine}') and os.path.isdir(new)
    assert not stale.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()
    assert (tmp_path / first).is_dir()  # this process's earlier scratch stays (it may still be in use)
