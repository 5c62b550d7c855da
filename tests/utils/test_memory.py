"""What keeps a trained model alive in a long process after its function returned."""

import gc
import itertools
import sys
import weakref

import pytest

_names = itertools.count()


class _Big:
    """Stands for a model and its optimizer."""


@pytest.fixture
def keeps_import_error(tmp_path, monkeypatch):
    """A fresh module that keeps the error of an optional import, as paramiko (imported by Composer) keeps
    ``invoke_import_error``; importing it inside a function pins that function's frame."""
    name = f'_keeps_import_error_{next(_names)}'
    (tmp_path / f'{name}.py').write_text('try:\n    import _no_such_module_here\n'
                                          'except ImportError as error:\n    import_error = error\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _train(module_name, then=None):
    big = _Big()
    __import__(module_name)  # the lazy import, while `big` is a local
    if then is not None:
        then()
    return weakref.ref(big)


def test_release_memory_frees_what_a_module_level_import_error_pins(keeps_import_error):
    from darwinlm_foundry.utils.memory import release_memory

    ref = _train(keeps_import_error)
    gc.collect()
    assert ref() is not None  # the bug: the traceback's frames reach _train's frame, and `big`
    release_memory()
    assert ref() is None
    error = sys.modules[keeps_import_error].import_error
    assert isinstance(error, ImportError) and error.__traceback__ is None  # the error itself stays


def test_close_trainer_frees_its_callers_frame_from_a_lazy_import(keeps_import_error):
    """Every fit ends with close_trainer: a function that imported Composer lazily and fitted is freed on return."""
    from darwinlm_foundry.utils.composer import close_trainer

    class Trainer:
        def close(self):
            pass

    ref = _train(keeps_import_error, then=lambda: close_trainer(Trainer()))
    assert ref() is None  # no gc.collect(): plain reference counting frees it
