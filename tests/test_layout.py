"""The package's folders follow the data flow one way (design/LAYOUT.md): every import, lazy ones inside
functions included, goes to a folder lower in FLOW, so there is no import circle between folders and, e.g.,
structure and obs never import search, stages or eval."""

import ast
from pathlib import Path

from conftest import REPO

# lowest first: the HF model format, shared helpers, pure structure, text, OBS, search, the Composer
# algorithm, evaluation, the chain's stages, and the callback at the top
FLOW = ['modeling', 'utils', 'structure', 'data', 'obs', 'search', 'algorithms', 'eval', 'stages', 'callbacks']


def _imports(path: Path, package_parts):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package_parts[:len(package_parts) - node.level + 1]
                yield base + (node.module.split('.') if node.module else [])
            elif node.module:
                yield node.module.split('.')
        elif isinstance(node, ast.Import):
            yield from (alias.name.split('.') for alias in node.names)


def test_imports_go_down_the_data_flow():
    files = [(p, ['darwinlm_foundry', *p.relative_to(REPO / 'darwinlm_foundry').parts[:-1]])
             for p in (REPO / 'darwinlm_foundry').rglob('*.py')]
    files += [(p, ['darwinlm_foundry', 'callbacks']) for p in (REPO / 'callbacks').glob('*.py')]
    folders = {Path(p).name for p in (REPO / 'darwinlm_foundry').iterdir() if p.is_dir() and
               any(p.glob('*.py'))} | {'callbacks'}
    assert folders == set(FLOW)  # every folder has its place in the flow
    upward = []
    for path, package in files:
        src = package[1] if len(package) > 1 else None
        for parts in _imports(path, package):
            if parts[0] != 'darwinlm_foundry' or len(parts) < 2 or parts[1] not in FLOW or src is None:
                continue
            if FLOW.index(parts[1]) > FLOW.index(src):
                upward.append(f'{path.relative_to(REPO)} imports {".".join(parts)}')
    assert upward == []


def test_the_check_sees_relative_and_lazy_imports(tmp_path):
    module = tmp_path / 'm.py'
    module.write_text('def f():\n    from ..search import engine\n    import darwinlm_foundry.stages.chain\n')
    found = list(_imports(module, ['darwinlm_foundry', 'obs']))
    assert found == [['darwinlm_foundry', 'search'], ['darwinlm_foundry', 'stages', 'chain']]
