"""The README opens with exactly two set-up commands, and CI runs the second one verbatim."""

import re

from conftest import REPO


def readme_commands():
    text = (REPO / 'README.md').read_text()
    blocks = re.findall(r'```(?:bash|sh)\n(.*?)```', text, flags=re.S)
    return [line for block in blocks[:2] for line in block.strip().splitlines()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2, commands
    install_and_run, install_and_test = commands
    assert 'pytest' in install_and_test and 'pytest' not in install_and_run
    ci = (REPO / '.ci' / 'run').read_text().splitlines()
    assert install_and_test in ci


def test_piece_table_paths_exist_and_cover_every_package_folder():
    """Every path in the README's piece table exists (``folder/`` (``a.py``, ...) names files in that folder),
    and every folder of the package appears in it."""
    text = (REPO / 'README.md').read_text()
    table = text[text.index('| piece', text.index('## The pieces')):]
    table = table[:table.index('\n\n')]
    paths = []
    for row in table.splitlines()[2:]:
        where = row.rstrip(' |').rsplit(' | ', 1)[1]
        for folder, files in re.findall(r'`([^`]+)`(?: \(([^)]*)\))?', where):
            paths.append(folder)
            if folder.endswith('/'):  # `folder/` (`a.py`, `b.py`): files in it; other parentheses are prose
                paths += [folder + name for name in re.findall(r'`([^`]+)`', files)]
    assert len(paths) > 30, paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, missing
    folders = {p.parent.relative_to(REPO).as_posix() + '/' for p in (REPO / 'darwinlm_foundry').glob('*/*.py')}
    uncovered = [f for f in folders if not any(p.startswith(f) for p in paths)]
    assert not uncovered, uncovered
