"""Peak resident memory of this process, per stage.

The chain runs every stage in one process, so ``ru_maxrss`` (the peak since the process began) cannot tell
which stage held the most. On Linux writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's peak
(``VmHWM`` in ``/proc/self/status``) to the current resident size, so the peak can be read per stage.
Elsewhere the reset is a no-op and the peak is ``ru_maxrss`` (then it includes earlier stages).
"""

import resource

__all__ = ['reset_peak_rss', 'peak_rss_gb']


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
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux (bytes on macOS)
