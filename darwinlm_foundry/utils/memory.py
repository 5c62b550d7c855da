"""Peak resident memory of this process, per stage.

The chain runs every stage in one process, so ``ru_maxrss`` (the peak since the process began) cannot tell
which stage held the most. On Linux writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's peak
(``VmHWM`` in ``/proc/self/status``) to the current resident size, so the peak can be read per stage.
Elsewhere the reset is a no-op and the peak is ``ru_maxrss`` (then it includes earlier stages).

Freed memory: many mid-sized tensors of a forward or fine-tuning pass come from glibc's heap (below its mmap
threshold, which rises to 32 MB after large frees); freed, they stay in the process, fragmented.
:func:`trim_heap` gives them back; :func:`release_memory` also collects reference cycles first (a Composer
Trainer is one), which the chain does after every stage, and before that frees the frames that libraries' stored
import errors pin (:func:`drop_module_exception_tracebacks`).
"""

import gc
import resource
import sys

__all__ = ['reset_peak_rss', 'peak_rss_gb', 'rss_gb', 'trim_heap', 'release_memory', 'drop_module_exception_tracebacks']

_LIBC = None


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op elsewhere)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL('libc.so.6')
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def drop_module_exception_tracebacks() -> int:
    """Drop the tracebacks of exceptions that imported modules keep at module level; returns how many.

    A library that keeps the error of an optional import (paramiko, imported by Composer, keeps
    ``invoke_import_error``) keeps its traceback, whose frames reach, through ``f_back``, every frame that was on
    the stack at the import, locals included, for the rest of the process. A lazy ``from composer ...`` inside a
    function that trains a model thereby kept that model and its AdamW moments alive (2 GB for SmolLM2). The
    exceptions themselves (their type and message) stay."""
    dropped = 0
    for module in list(sys.modules.values()):
        for value in list(getattr(module, '__dict__', {}).values()):
            seen = set()
            # type(), not isinstance(): some module attributes warn when their __class__ is read
            while issubclass(type(value), BaseException) and id(value) not in seen:  # and what it was raised from
                seen.add(id(value))
                if value.__traceback__ is not None:
                    value.__traceback__ = None
                    dropped += 1
                value = value.__cause__ or value.__context__
    return dropped


def release_memory() -> None:
    """Free what only module-level exceptions' tracebacks hold (:func:`drop_module_exception_tracebacks`),
    collect unreachable cycles, then give the freed heap back to the OS."""
    drop_module_exception_tracebacks()
    gc.collect()
    trim_heap()


def rss_gb() -> float:
    """Current resident memory (GiB) of this process (0.0 where ``/proc`` is not available)."""
    return _status_kb('VmRSS:') / 2**20


def _status_kb(key: str) -> int:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Start a new peak at the current resident size; False where the platform cannot (the peak then
    includes what ran before)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """Peak resident memory (GiB) since the last :func:`reset_peak_rss`, or since the process began."""
    hwm = _status_kb('VmHWM:')
    if hwm:
        return hwm / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux (bytes on macOS)
