"""Keeping library chatter out of long runs' logs."""

import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet(*names: str):
    """Raise the named loggers to ERROR and silence warnings for the duration, then restore them."""
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            yield
        finally:
            for n, level in saved.items():
                logging.getLogger(n).setLevel(level)
