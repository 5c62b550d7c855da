"""Export (HF directory in the DarwinLM format, loaded by stock transformers in a clean process) and report."""

import json
import re

import pytest
import torch
import transformers
from conftest import load_in_clean_process

from darwinlm_foundry.eval.export import EXPORT_INFO_FILE, export_pruned
from darwinlm_foundry.eval.report import layers_from_config, write_report
from darwinlm_foundry.structure.levels import LevelSpec
from darwinlm_foundry.structure.shrinking import shrink_model
from darwinlm_foundry.structure.units import Unit

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def tokenizer():
    from darwinlm_foundry.data.sources import embedded_tokenizer
    return embedded_tokenizer()


def _dense(vocab):
    """10 heads and 320 = 10 x 32 MLP columns: every level is exact (level L keeps (10 - L) / 10)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=40, num_attention_heads=10, num_key_value_heads=2,
                                   head_dim=4, intermediate_size=320, num_hidden_layers=2,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    cfg._attn_implementation = 'sdpa'
    return transformers.LlamaForCausalLM(cfg).eval()


LEVELS = {'attn': [3, 6], 'mlp': [5, 10]}  # layer 1's MLP at level 10 is removed


def _pruned(dense):
    spec = LevelSpec.from_config(dense.config)
    kept = {}
    for kind in LEVELS:
        for layer, level in enumerate(LEVELS[kind]):
            n = spec.dense[kind]
            kept[Unit(layer, kind)] = list(range(n - spec.keep(kind, level), n))  # the last ones, any subset works
    return shrink_model(dense, kept)


def test_export_loads_in_clean_process_with_same_logits(tmp_path, tokenizer):
    dense = _dense(len(tokenizer))
    model = _pruned(dense)
    out = export_pruned(model, tmp_path / 'final', tokenizer=tokenizer, base_model='tiny-llama-test',
                        data_note='embedded RedPajama sample', extra={'search': '3 generations'})
    files = {p.name for p in out.iterdir()}
    assert {'model.safetensors', 'config.json', 'README.md', EXPORT_INFO_FILE, 'modeling_darwinlm.py',
            'configuration_darwinlm.py', 'tokenizer_config.json'} <= files
    assert not any(name.endswith('.bin') for name in files)
    assert [p.name for p in tmp_path.iterdir()] == ['final']  # no temporary directory left behind
    ids = torch.randint(3, len(tokenizer), (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(load_in_clean_process(out, ids, tmp_path), expected)

    config = json.loads((out / 'config.json').read_text())
    assert config['levels'] == LEVELS and config['level_steps'] == {'attn': 1, 'mlp': 32}
    assert [len(h) for h in config['layer_heads']] == [7, 4] and config['layer_intermediate_sizes'] == [160, 0]
    assert model.config.levels is None  # the caller's model is not modified
    params = sum(p.numel() for p in model.parameters())
    dense_params = sum(p.numel() for p in dense.parameters())
    info = json.loads((out / EXPORT_INFO_FILE).read_text())
    assert (info['parameters'], info['dense_parameters']) == (params, dense_params)
    card = (out / 'README.md').read_text()
    assert f'**Parameter count:** {params:,}' in card and f'**Dense parameter count:** {dense_params:,}' in card
    assert 'base_model: tiny-llama-test' in card and 'embedded RedPajama sample' in card
    heads0 = ', '.join(map(str, config['layer_heads'][0]))
    assert f'| 0 | 3 | 7/10 | {heads0} | 5 | 160/320 |' in card
    assert re.search(r'\| 1 \| 6 \| 4/10 \| [0-9, ]+ \| 10 \| 0/320 \|', card)
    assert transformers.AutoTokenizer.from_pretrained(out)('hello world').input_ids == tokenizer('hello world').input_ids


def test_export_dense_converts_and_guards(tmp_path, tokenizer):
    dense = _dense(512)
    out = export_pruned(dense, tmp_path / 'dense', tokenizer=tokenizer, base_model='tiny', data_note='none',
                        dtype=torch.bfloat16)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, torch_dtype='auto')
    assert loaded.config.model_type == 'darwinlm' and loaded.dtype == torch.bfloat16
    assert loaded.config.levels == {'attn': [0, 0], 'mlp': [0, 0]}
    assert next(dense.parameters()).dtype == torch.float32  # source untouched
    source = dense.state_dict()
    for name, tensor in loaded.state_dict().items():  # every weight is the dense one, rounded to bf16
        assert torch.equal(tensor, source[name].to(torch.bfloat16)), name
    with pytest.raises(FileExistsError, match='overwrite=True'):
        export_pruned(dense, out, tokenizer=tokenizer, base_model='tiny', data_note='none')
    pruned = _pruned(_dense(512))
    with pytest.raises(ValueError, match='do not match the model'):
        export_pruned(pruned, out, tokenizer=tokenizer, base_model='tiny', data_note='none', overwrite=True,
                      levels={'attn': [5, 5], 'mlp': [5, 5]})
    export_pruned(pruned, out, tokenizer=tokenizer, base_model='tiny', data_note='none', overwrite=True,
                  levels=LEVELS)
    assert json.loads((out / 'config.json').read_text())['layer_intermediate_sizes'] == [160, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dense']


def _md_table(md, header_start):
    """Rows (lists of cells) of the markdown table whose header starts with ``header_start``."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith('|'):
            break
        rows.append([c.strip() for c in line.strip('|').split('|')])
    return [c.strip() for c in lines[i].strip('|').split('|')], rows


def test_report_markdown_matches_json(tmp_path):
    model = _pruned(_dense(64))
    eval_table = [
        {'method': 'dense', 'params': 6_738_415_616, 'tasks': {'arc_easy': 0.7626, 'piqa': 0.7807, 'boolq': 0.7774}},
        {'method': 'uniform level 5', 'params': 3_400_000_000, 'tasks': {'arc_easy': 0.4, 'piqa': 0.55, 'boolq': 0.62}},
        {'method': 'DarwinLM', 'params': 2_600_000_000, 'tasks': {'arc_easy': 0.6512, 'piqa': 0.7, 'boolq': 0.71}},
    ]
    history = [0.91, 0.72, 0.7, 0.55]
    speedups = [{'workload': 'prefill b16', 'level': 5, 'ideal': 1.88, 'speedup': 1.61}]
    sizes = {'dense': 6_738_415_616, 'uniform level 5': 3_400_000_000, 'DarwinLM': 2_600_000_000}
    paths = write_report(tmp_path, sizes=sizes, levels=layers_from_config(model.config), fitness_history=history,
                         eval_table=eval_table, speedups=speedups, title='tiny run')
    doc = json.loads(paths['json'].read_text())
    md = paths['markdown'].read_text()

    header, rows = _md_table(md, '| method |')
    assert header[:2] == ['method', 'params'] and header[-1] == 'avg'
    assert [r[0] for r in rows] == [r['method'] for r in doc['eval_table']] == ['dense', 'uniform level 5', 'DarwinLM']
    for cells, row in zip(rows, doc['eval_table']):
        for task, cell in zip(header[2:-1], cells[2:-1]):
            assert float(cell) == pytest.approx(row['tasks'][task], abs=5e-5)
        assert row['avg'] == pytest.approx(sum(row['tasks'].values()) / 3)
        assert float(cells[-1]) == pytest.approx(row['avg'], abs=5e-5)
    assert rows[0][1] == '6.7B' and rows[2][1] == '2.6B'

    _, size_rows = _md_table(md, '| model | parameters |')
    assert {r[0]: int(r[1].replace(',', '')) for r in size_rows} == doc['sizes'] == sizes
    _, layer_rows = _md_table(md, '| layer |')
    assert [[int(c) for c in r] for r in layer_rows] == [
        [i, doc['layers']['attn'][i], doc['layers']['heads'][i], doc['layers']['mlp'][i], doc['layers']['mlp_width'][i]]
        for i in range(2)] == [[0, 3, 7, 5, 160], [1, 6, 4, 10, 0]]
    _, fit_rows = _md_table(md, '| generation |')
    assert [h['fitness'] for h in doc['fitness_history']] == history
    assert [float(r[1]) for r in fit_rows] == pytest.approx(history, abs=5e-7)
    speed_header, speed_rows = _md_table(md, '| workload |')
    cells = dict(zip(speed_header, speed_rows[0]))
    assert float(cells['ideal']) == doc['speedups'][0]['ideal'] == 1.88
    assert float(cells['speedup']) == doc['speedups'][0]['speedup'] == 1.61

    import matplotlib.image as mpimg
    for key in ('layers_png', 'fitness_png'):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC
        image = mpimg.imread(paths[key])
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # something was drawn


def test_report_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match='"method" and "tasks"'):
        write_report(tmp_path, sizes={}, levels={'heads': [1], 'mlp_width': [2]}, eval_table=[{'tasks': {}}])
    with pytest.raises(ValueError, match='missing'):
        write_report(tmp_path, sizes={}, levels={'heads': [1]})


def _winner_json(fitness, probe=None, start_probe=None):
    """winner.json data as the search writes it (probe=None: a search from before the probe existed)."""
    history = []
    for g, f in enumerate(fitness):
        record = {'generation': g, 'fitness': f, 'parent_won': False, 'winner': {}}
        if probe is not None:
            record['probe_fitness'] = probe[g]
        history.append(record)
    data = {'fitness': fitness[-1] if fitness else None, 'fitness_history': list(fitness), 'history': history}
    if probe is not None:
        data.update(probe_fitness=probe[-1] if probe else start_probe, start_probe_fitness=start_probe)
    return data


def test_report_draws_one_curve_per_search(tmp_path, monkeypatch):
    """The export stage hands every search stage's winner.json to the report: one line per stage, labelled by
    the stage, drawn from the probe fitness where recorded (else the fresh-sample fitness)."""
    import darwinlm_foundry.eval.report as report
    drawn = []
    plot = report._plot_fitness
    monkeypatch.setattr(report, '_plot_fitness', lambda curves, path: (drawn.append(curves), plot(curves, path)))
    model = _pruned(_dense(64))
    searches = {
        'search5': _winner_json([0.9, 0.4, 0.7], probe=[0.8, 0.75, 0.6], start_probe=1.1),  # fresh samples jump
        'search6': _winner_json([0.5, 0.45]),  # written before the probe existed
        'uniform5': _winner_json([], probe=[], start_probe=1.1),  # generations: 0
    }
    paths = write_report(tmp_path, sizes={'dense': 1}, levels=layers_from_config(model.config),
                         fitness_curves=searches)
    doc = json.loads(paths['json'].read_text())
    curves = {c['label']: c for c in doc['fitness_curves']}
    assert list(curves) == ['search5', 'search6', 'uniform5']
    assert curves['search5']['kind'] == 'probe'
    assert curves['search5']['points'] == [{'generation': 0, 'fitness': 1.1}, {'generation': 1, 'fitness': 0.8},
                                           {'generation': 2, 'fitness': 0.75}, {'generation': 3, 'fitness': 0.6}]
    assert curves['search6'] == {'label': 'search6', 'kind': 'fitness', 'points': [
        {'generation': 1, 'fitness': 0.5}, {'generation': 2, 'fitness': 0.45}]}
    assert curves['uniform5']['points'] == [{'generation': 0, 'fitness': 1.1}]
    # one line per search in the plot, with the data above
    assert len(drawn) == 1 and [c['label'] for c in drawn[0]] == ['search5', 'search6', 'uniform5']
    assert [c['points'] for c in drawn[0]] == [c['points'] for c in doc['fitness_curves']]
    assert paths['fitness_png'].read_bytes()[:8] == PNG_MAGIC
    # the markdown table: one column per search, every generation any of them has
    header, rows = _md_table(paths['markdown'].read_text(), '| generation |')
    assert header == ['generation', 'search5 probe', 'search6 fitness', 'uniform5 probe']
    assert rows == [['0', '1.100000', '-', '1.100000'], ['1', '0.800000', '0.500000', '-'],
                    ['2', '0.750000', '0.450000', '-'], ['3', '0.600000', '-', '-']]
    # two searches (the export stage's usual case): two lines
    drawn.clear()
    paths = write_report(tmp_path / 'two', sizes={}, levels=layers_from_config(model.config),
                         fitness_curves={k: searches[k] for k in ('search5', 'search6')})
    assert len(json.loads(paths['json'].read_text())['fitness_curves']) == 2 and len(drawn[0]) == 2
