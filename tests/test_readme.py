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
