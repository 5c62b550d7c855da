"""bench/kill_resume.py's pure helpers."""

import importlib.util

from conftest import REPO

_spec = importlib.util.spec_from_file_location('kill_resume', REPO / 'bench' / 'kill_resume.py')
KILL = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(KILL)


def test_stages_hit_names_the_stage_running_at_each_kill():
    log = '\n'.join([
        '[darwinlm] stage dense (model): running', '[darwinlm] stage dense (model): done in 33s',
        '[darwinlm] stage data (data): running', '[darwinlm] stage data (data): done in 7s',
        '[darwinlm] stage database5 (database): running',
        '===== kill during dense after 59.96s: True',  # planned for dense, landed in database5
        '[darwinlm] stage dense (model): finished earlier, skipped',
        '[darwinlm] stage database5 (database): running', '[darwinlm] stage search5 (search): running',
        '===== kill during search5 after 3.00s: True',
        '===== kill during export after 1.00s: False'])
    assert KILL.stages_hit(log) == ['database5', 'search5', None]
