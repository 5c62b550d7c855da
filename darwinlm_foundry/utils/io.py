"""Atomic file writes, the one place the package writes a file that a kill must never leave half-written.

Every writer goes the same way: a temporary file beside the target (same directory, so the rename stays on one
file system), flush, fsync, ``os.replace`` onto the target, then an fsync of the directory where the platform
allows it. A reader therefore sees the old file or the new one, never a mix.
"""

import json
import os
from typing import Any, BinaryIO, Callable, Union

__all__ = ['atomic_write_bytes', 'atomic_write_text', 'atomic_write_json', 'fsync_dir']

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
