"""Atomic file writes, the one place the package writes a file that a kill must never leave half-written.

Every writer goes the same way: a temporary file beside the target (same directory, so the rename stays on one
file system), flush, fsync, ``os.replace`` onto the target, then an fsync of the directory where the platform
allows it. A reader therefore sees the old file or the new one, never a mix.
"""

import json
import os
import re
import shutil
import socket
import tempfile
from typing import Any, BinaryIO, Callable, Union

__all__ = ['atomic_write_bytes', 'atomic_write_text', 'atomic_write_json', 'fsync_dir', 'process_scratch_dir']

PathLike = Union[str, 'os.PathLike[str]']


def fsync_dir(directory: PathLike) -> None:
    """fsync a directory so a rename in it survives a crash (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: Union[bytes, Callable[[BinaryIO], Any]]) -> None:
    """Write ``data`` (bytes, or a function that writes into the open binary file) to ``path`` atomically."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp.{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path: PathLike, obj: Any, *, newline: bool = False, **dumps_kwargs) -> None:
    """Write ``json.dumps(obj, **dumps_kwargs)`` (plus a final newline when asked) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + ('\n' if newline else ''))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user's process
        return True
    return True


def process_scratch_dir(parent: PathLike, prefix: str) -> str:
    """A new private directory ``<parent>/<prefix><host>-<pid>-<random>`` for this process's scratch files, after
    removing the ones that dead processes of this host left in ``parent`` (a run killed while it held scratch
    files would otherwise leave them there for good, one set per kill). Directories of other hosts (a shared
    file system) and of live processes are left alone."""
    host = re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname()) or 'host'
    os.makedirs(parent, exist_ok=True)
    stale = re.compile(re.escape(f'{prefix}{host}-') + r'(\d+)-')
    for name in os.listdir(parent):
        match = stale.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f'{prefix}{host}-{os.getpid()}-', dir=parent)
