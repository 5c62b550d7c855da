"""Scale plan for Llama-2-7B / 13B / 70B, measured on one real-shaped layer rather than guessed (issue 14 point 5).

Builds the OBS sparsity database (``darwinlm_foundry.obs.database.build_database``, the build the database
stage runs) of ONE Llama-2-7B-shaped layer and ONE Llama-3.1-8B-shaped layer (random weights, real shapes,
``num_hidden_layers=1``), each in its own child process so its peak RSS is its own. The build records its own
split (``SparsityDatabase.build_stats``): calibration forward, Hessian accumulation (the ``X^T X`` hook), OBS
solves per unit kind and unit writes, in wall and CPU seconds. The per-layer figures are
then scaled to whole models: layers x measured cost for 7B, FLOP ratios for 13B / 70B (cubic in the output
matrix's columns for the solves, tokens x columns^2 for the Hessians, tokens x layer parameters for the
forward), and FLOP-scaled to an H100 at a stated efficiency. The search cost per generation and the memory
per rank are computed from the paper's schedule (``SearchSettings`` defaults) and FLOP counts only.

    python bench/scale_plan.py            # full shapes, ~15-25 min on 2 cores
    python bench/scale_plan.py --quick    # hidden 512 smoke test, ~1 min
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

ARCH = {  # hidden, heads, kv heads, MLP width, vocabulary, layers
    '7b': (4096, 32, 32, 11008, 32000, 32), '8b': (4096, 32, 8, 14336, 128256, 32),
    '13b': (5120, 40, 40, 13824, 32000, 40), '70b': (8192, 64, 8, 28672, 32000, 80)}
QUICK = {'7b': (512, 8, 8, 1376, 32000, 32), '8b': (512, 8, 2, 1792, 128256, 32)}
# Assumptions for the H100 projection (SXM, dense peaks in FLOP/s), stated in the output.
H100 = {'bf16': 989e12, 'tf32': 495e12, 'fp32': 67e12, 'fp64': 67e12, 'mem_gb': 80}
EFF = 0.40  # fraction of the relevant peak assumed reached (large GEMM-bound work)
CALIB_PAPER = (2048, 4096)  # yamls/darwinlm_llama2.yaml: calibration sequences x seq_len
SEARCH_SEQ = 1024  # yamls/darwinlm_llama2.yaml search seq_len
LAUNCH_S_PER_STEP = 0.4e-3  # ~40 small kernels per greedy OBS step x ~10 us launch: the GPU solve's latency floor
STORE_DTYPE = 'bfloat16'  # a real checkpoint is loaded in its stored 16-bit dtype; the database stores that


def llama_config(shape):
    from transformers import LlamaConfig
    h, a, kv, m, v, layers = shape
    return LlamaConfig(hidden_size=h, num_attention_heads=a, num_key_value_heads=kv, intermediate_size=m,
                       vocab_size=v, num_hidden_layers=layers, max_position_embeddings=4096)


def gemm(n, dtype_name, reps=3):
    """FLOP/s of an n x n matmul by wall time and per thread-normalised CPU time (CPU s / torch threads)."""
    import torch
    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype_name)) for _ in range(2))
    a @ b  # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        a @ b
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    flops = 2 * n ** 3 * reps
    return {'n': n, 'wall_gflops': flops / wall / 1e9, 'cpu_gflops': flops / (cpu / torch.get_num_threads()) / 1e9}


def measure_layer(name, shape, sequences, seq_len):
    """Child process: build the database of one layer of ``shape``; return the measured breakdown."""
    import torch
    from transformers import LlamaForCausalLM
    from darwinlm_foundry.obs import database

    threads = torch.get_num_threads()
    peak = [0]

    def sample():  # sampled RSS: ru_maxrss would include the model's own random init peak
        while True:
            with open('/proc/self/statm') as f:
                peak[0] = max(peak[0], int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))
            time.sleep(0.05)
    threading.Thread(target=sample, daemon=True).start()
    torch.manual_seed(0)
    config = llama_config(shape[:5] + (1,))
    # The build never runs the LM head (calibration stops at layer 0's inputs), so it is tied to the embedding to
    # fit a shared 24 GiB machine (the 8B's untied fp32 head is 2.1 GB); the report adds it back to the peak.
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config).eval()  # fp32: CPU bf16 matmuls are slower; storage below is bf16
    time.sleep(0.2)
    model_rss = peak[0]
    peak[0] = 0
    ids = torch.randint(config.vocab_size, (sequences, seq_len), generator=torch.Generator().manual_seed(0))
    batches = [ids[i:i + 8] for i in range(0, sequences, 8)]

    with tempfile.TemporaryDirectory(dir=os.environ.get('SCALE_PLAN_TMP')) as db_dir:
        db = database.build_database(model, batches, db_dir, weight_dtype=getattr(torch, STORE_DTYPE), log_fn=None)
        db_bytes = db.storage_bytes()
        unit_bytes = {r['kind']: r['bytes'] for r in db.manifest['units'].values()}
        tokens = db.manifest['calibration']['tokens']
    w, c = db.build_stats['wall_s'], db.build_stats['cpu_s']  # the build's own phase split
    n = lambda cpu_s: cpu_s / threads  # per-thread-normalised CPU seconds
    rest = lambda t: t['write'] + t['other']  # fingerprint, writes, manifest
    return {'layer': name, 'shape': dict(zip(('hidden', 'heads', 'kv_heads', 'mlp', 'vocab'), shape[:5])),
            'tokens': tokens, 'seq_len': seq_len, 'threads': threads, 'wall_s': w['total'], 'cpu_s': c['total'],
            'cpu_norm_s': n(c['total']),
            'phases_cpu_norm_s': {'forward': n(c['forward']), 'hessian': n(c['hessian']), 'solve': n(c['solve']),
                                  'write_and_rest': n(rest(c))},
            'phases_wall_s': {'forward': w['forward'], 'hessian': w['hessian'], 'solve': w['solve'],
                              'write_and_rest': rest(w)},
            'solve_cpu_norm_s': {k: n(c[f'solve_{k}']) for k in ('attn', 'mlp')},
            'solve_wall_s': {k: w[f'solve_{k}'] for k in ('attn', 'mlp')},
            'db_bytes': db_bytes, 'unit_bytes': unit_bytes, 'model_rss_gb': model_rss / 2**30,
            'build_peak_rss_gb': peak[0] / 2**30, 'untied_head_gb': shape[0] * shape[4] * 4 / 2**30,
            'ru_maxrss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# ----------------------------------------------------------------------------------------------------------
# Scaling (pure arithmetic on the measured numbers)
# ----------------------------------------------------------------------------------------------------------
def layer_params(shape):
    h, a, kv, m = shape[:4]
    hd = h // a
    return h * (a * hd) * 2 + 2 * h * (kv * hd) + 3 * h * m  # q, o, k, v, gate/up/down (norms negligible)


def flops_forward(shape, tokens, seq):  # one layer: 2 x params per token plus the attention scores (QK^T, AV)
    return 2 * tokens * layer_params(shape) + 4 * tokens * seq * shape[0]


def flops_hessian(shape, tokens):  # X^T X of o_proj (heads*head_dim = hidden columns) and down_proj inputs
    return 2 * tokens * (shape[0] ** 2 + shape[3] ** 2)


def db_bytes_formula(shape, itemsize=2):
    """Bytes of one layer's unit files from the level spec: compensated columns above level 0 + kept ids."""
    from darwinlm_foundry.structure.levels import LevelSpec
    spec = LevelSpec.from_config(llama_config(shape[:5] + (1,)))
    total = 0
    for kind in ('attn', 'mlp'):
        g = spec.structure_size(kind)
        for level in spec.levels_available(kind, 0):
            keep = spec.keep(kind, level)
            total += 4 * keep + (shape[0] * keep * g * itemsize if level else 0)
    return total


def greedy_steps(shape):
    """Greedy OBS steps of one layer: structures removed down to the smallest positive keep count."""
    from darwinlm_foundry.structure.levels import LevelSpec
    spec = LevelSpec.from_config(llama_config(shape[:5] + (1,)))
    return sum(spec.dense[k] - min(c for c in (spec.keep(k, l) for l in spec.levels_available(k, 0)) if c > 0)
               for k in ('attn', 'mlp'))


def params_at(shape, level):
    from darwinlm_foundry.structure.levels import LevelSpec
    return LevelSpec.from_config(llama_config(shape)).parameter_count(level)


def plan(layers, gemm_f64):
    """Whole-model rows: database build (measured CPU -> H100), search cost per generation, memory per rank."""
    from darwinlm_foundry.search.settings import SearchSettings
    s = SearchSettings()
    ref, ref_shape = layers['7b'], ARCH['7b']
    t_meas, t_paper, seq = ref['tokens'], CALIB_PAPER[0] * CALIB_PAPER[1], ref.get('seq_len', 512)
    # candidates per selection step: all offspring, then the survivors of the step before; the parent joins last
    cand = [s.offspring] + list(s.survivors[:-2]) + [s.survivors[-2] + 1]
    peak = H100['bf16'] * EFF
    rows = {}
    for name in ('7b', '13b', '70b', '8b'):
        shape = ARCH[name]
        h, a, kv, m, v, L = shape
        measured = name in layers
        me = layers[name] if measured else ref
        # CPU-normalised seconds per layer at the measured tokens: measured, or FLOP-scaled from the 7B layer
        # (solves cubic in the unit's columns: the Cholesky inverse and the greedy refreshes are N^3)
        cols, ref_cols = {'attn': h, 'mlp': m}, {'attn': ref_shape[0], 'mlp': ref_shape[3]}
        solve = {k: me['solve_cpu_norm_s'][k] * (1 if measured else (cols[k] / ref_cols[k]) ** 3) for k in cols}
        fwd = me['phases_cpu_norm_s']['forward'] * (1 if measured else flops_forward(shape, t_meas, seq)
                                                    / flops_forward(ref_shape, t_meas, seq))
        hes = me['phases_cpu_norm_s']['hessian'] * (1 if measured else flops_hessian(shape, 1)
                                                     / flops_hessian(ref_shape, 1))
        sol = sum(solve.values())
        fwd_paper = fwd * flops_forward(shape, t_paper, CALIB_PAPER[1]) / flops_forward(shape, t_meas, seq)
        db_layer = sum(me['unit_bytes'].values()) if measured else db_bytes_formula(shape)  # unit files only
        # H100: forward in bf16 (the stored dtype), Hessian addmm in fp32 (x.float(); TF32 is off by default),
        # solves in fp64: measured CPU s x this CPU's fp64 GEMM FLOP/s = GEMM-equivalent FLOPs, plus launch latency
        h100 = {'forward': flops_forward(shape, t_paper, CALIB_PAPER[1]) / (H100['bf16'] * EFF),
                'hessian': flops_hessian(shape, t_paper) / (H100['fp32'] * EFF),
                'solve_flops': sol * gemm_f64 * 1e9 / (H100['fp64'] * EFF),
                'solve_latency': greedy_steps(shape) * LAUNCH_S_PER_STEP}
        h100_layer = sum(h100.values())
        dense, p5 = params_at(shape, 0), params_at(shape, 5)
        fl_tok = lambda p: 2 * (p - v * h) + 4 * L * SEARCH_SEQ * h  # embeddings are a lookup; lm_head counted
        per_cand = [3 * tr * fl_tok(p5) + fi * fl_tok(p5) for tr, fi in zip(s.train_tokens, s.fitness_tokens)]
        shared = sum(s.fitness_tokens) * fl_tok(dense) + s.probe_size * fl_tok(p5)  # dense targets, probe
        gen_flops = sum(c * f for c, f in zip(cand, per_cand)) + shared
        state_gb = 16 * p5 / 1e9  # fp32 params + grads + Adam m, v
        acts_gb = s.micro_batch_size * SEARCH_SEQ * (L * h * 34 + v * 8) / 1e9  # the search's own rule
        # activation_checkpointing: each layer's bf16 input kept, one layer's activations live at a time
        ckpt_gb = s.micro_batch_size * SEARCH_SEQ * (L * h * 2 + h * 34 + v * 8) / 1e9
        cache_gb = (sum(s.fitness_tokens) + s.probe_size) * v * 4 / 1e9  # fp32 dense log-probs, full vocabulary
        # 8 GPUs: whole candidates per GPU when one fits (offspring_parallel), else every fit sharded (FSDP)
        fits_one = state_gb + acts_gb + 2 * dense / 1e9 < 0.8 * H100['mem_gb']
        t8 = ((sum(-(-c // 8) * f for c, f in zip(cand, per_cand)) + shared / 8) if fits_one else gen_flops / 8) / peak
        base = state_gb / 8 + 2 * dense / 8 / 1e9 + cache_gb
        rows[name] = {
            'measured': measured, 'layers': L, 'dense_params': dense, 'level5_params': p5,
            'db_cpu_norm_s_per_layer_meas_tokens': {'forward': fwd, 'hessian': hes, 'solve': solve},
            'db_cpu_hours_meas_tokens': L * (fwd + hes + sol) / 3600,
            'db_cpu_hours_paper_tokens': L * (fwd_paper + hes * t_paper / t_meas + sol) / 3600,
            'db_gb': L * db_layer / 1e9, 'db_bytes_per_layer': db_layer, 'db_h100_s_per_layer_1gpu': h100,
            'db_h100_hours_1gpu': L * h100_layer / 3600, 'db_h100_hours_8gpu': L * h100_layer / 8 / 3600,
            'search_pflop_per_generation': gen_flops / 1e15, 'search_candidates_per_step': cand,
            'search_h100_s_per_gen_1gpu': gen_flops / peak, 'search_h100_s_per_gen_8gpu': t8,
            'search_h100_hours_200gen_1gpu': 200 * gen_flops / peak / 3600,
            'search_h100_hours_200gen_8gpu': 200 * t8 / 3600,
            'search_mode_8gpu': 'offspring_parallel' if fits_one else 'fsdp',
            'mem_rank_fsdp8_gb': {'train_state': state_gb / 8, 'dense_bf16_shard': 2 * dense / 8 / 1e9,
                                  'activations_mb4_seq1024': acts_gb, 'dense_target_cache': cache_gb,
                                  'total': base + acts_gb, 'activations_checkpointed': ckpt_gb,
                                  'total_checkpointed': base + ckpt_gb,
                                  # FSDP ranks needed so that a rank holds <= 90% of an H100, with checkpointing
                                  'min_ranks_checkpointed': math.ceil((state_gb + 2 * dense / 1e9)
                                                                      / (0.9 * H100['mem_gb'] - ckpt_gb - cache_gb))},
        }
    return rows


def markdown(res, cmd):
    g32, g64, L, c = res['gemm_fp32'], res['gemm_fp64'], res['layers'], res['check']
    out = ['# Scale plan: DarwinLM database and search for Llama-2 7B / 13B / 70B', '',
           f'Re-run: `{cmd}` ({res["elapsed_s"] / 60:.1f} min'
           + (f', reusing the {", ".join(res["reused"])} layer measured by an earlier run' if res.get('reused') else '')
           + f'). Wall times were taken on a **shared** CPU '
           f'({os.cpu_count()} cores, other jobs running, load {res["load"]}); CPU times are per-thread-normalised '
           f'(process CPU seconds / {res["threads"]} torch threads) and are the basis of all scaling.', '',
           f'This CPU: fp32 GEMM {g32["n"]}^2 {g32["cpu_gflops"]:.0f} GFLOP/s CPU-normalised '
           f'({g32["wall_gflops"]:.0f} by wall), fp64 {g64["cpu_gflops"]:.0f} ({g64["wall_gflops"]:.0f} by wall).', '',
           '## Measured: one layer, database build (CPU-normalised seconds)', '',
           '| layer | tokens | forward | Hessians | OBS solve attn / mlp | write+rest | total CPU (wall) | '
           'peak RSS of the build + untied LM head (while the model was made) | database bytes |', '|' + '---|' * 9]
    for k, r in L.items():
        p = r['phases_cpu_norm_s']
        out.append(f'| {k} ({r["shape"]}) | {r["tokens"]} | {p["forward"]:.1f} | {p["hessian"]:.1f} | '
                   f'{r["solve_cpu_norm_s"]["attn"]:.1f} / {r["solve_cpu_norm_s"]["mlp"]:.1f} | '
                   f'{p["write_and_rest"]:.1f} | {r["cpu_norm_s"]:.1f} ({r["wall_s"]:.1f}) | '
                   f'{r["build_peak_rss_gb"] + r["untied_head_gb"]:.2f} GB ({r["model_rss_gb"]:.2f} GB) | '
                   f'{r["db_bytes"] / 1e6:.1f} MB ({STORE_DTYPE}) |')
    out += ['', 'The layers are built with the LM head tied to the embedding (the build never runs the head; this kept '
            'the 8B layer inside the shared 24 GiB machine); the peak column adds the untied fp32 head back. '
            'Per-thread-normalised CPU time on an oversubscribed CPU includes threads waiting for each other, so '
            'it is an upper bound of the dedicated-core time.',
            '', f'Solve growth: 8B/7B MLP solve measured {c["mlp_solve_ratio"]:.2f}x, (columns ratio)^3 = '
            f'{c["mlp_cube_ratio"]:.2f}x (per-step N^2 work still counts at these sizes, so scaling 13B / 70B by '
            'columns^3 is an upper bound). Database bytes from the level spec: '
            f'{c["db_formula_7b"] / 1e6:.1f} MB, measured {c["db_measured_7b"] / 1e6:.1f} MB per 7B layer.', '',
            '## Plan (7B: layers x the measured layer; 8B: measured layer; 13B / 70B: FLOP-scaled from the 7B layer)',
            '', f'H100 (SXM) at {EFF:.0%} of dense peak: bf16 {H100["bf16"] / 1e12:.0f} (calibration forward, search), '
            f'fp32 {H100["fp32"] / 1e12:.0f} (Hessian addmm; TF32 {H100["tf32"] / 1e12:.0f} is off by default), '
            f'fp64 tensor-core {H100["fp64"] / 1e12:.0f} TFLOP/s (the solver runs in float64: its FLOPs are the '
            'measured CPU s x this CPU\'s fp64 GEMM FLOP/s, scaled by columns^3), plus a latency floor of '
            f'{LAUNCH_S_PER_STEP * 1e3:.1f} ms per greedy OBS step (~40 small kernels; assumed, not measured). '
            f'Calibration as in the paper: {CALIB_PAPER[0]} x {CALIB_PAPER[1]} tokens; 8 GPUs split the sequences '
            'and deal the solves round-robin (ideal /8).', '',
            '| model | layers | DB source | DB CPU h (measured tokens) | DB CPU h (paper tokens) | DB disk GB | '
            'DB H100 h 1 / 8 GPU | H100 s per layer: fwd / Hessian / solve / solve latency | search PFLOP / gen | '
            'search H100 s/gen 1 / 8 GPU | 200 gen H100 h 1 / 8 GPU | 8-GPU mode | FSDP-8 GB/rank '
            '(state+dense+acts+cache) | same, activation checkpointing |', '|' + '---|' * 14]
    for k, r in res['plan'].items():
        mm = r['mem_rank_fsdp8_gb']
        out.append(f'| {k} | {r["layers"]} | {"measured layer" if r["measured"] else "scaled from 7B"} | '
                   f'{r["db_cpu_hours_meas_tokens"]:.2f} | {r["db_cpu_hours_paper_tokens"]:.0f} | {r["db_gb"]:.1f} | '
                   f'{r["db_h100_hours_1gpu"]:.2f} / {r["db_h100_hours_8gpu"]:.3f} | '
                   f'{" / ".join(f"{x:.1f}" for x in r["db_h100_s_per_layer_1gpu"].values())} | '
                   f'{r["search_pflop_per_generation"]:.1f} | {r["search_h100_s_per_gen_1gpu"]:.0f} / '
                   f'{r["search_h100_s_per_gen_8gpu"]:.0f} | {r["search_h100_hours_200gen_1gpu"]:.1f} / '
                   f'{r["search_h100_hours_200gen_8gpu"]:.1f} | {r["search_mode_8gpu"]} | {mm["total"]:.1f} '
                   f'({mm["train_state"]:.1f}+{mm["dense_bf16_shard"]:.1f}+{mm["activations_mb4_seq1024"]:.1f}+'
                   f'{mm["dense_target_cache"]:.1f}) | {mm["total_checkpointed"]:.1f} '
                   f'(>= {mm["min_ranks_checkpointed"]} ranks to fit) |')
    out += ['', 'Search per generation (SearchSettings defaults, all computed, nothing of the search was run here): '
            '16 / 8 / 4 / 2+parent candidates fine-tuned on 10K / 50K / 100K / 200K tokens (6 x params x tokens) and '
            'scored on 1024 / 2048 / 4096 / 8192 tokens (2 x params x tokens) at level-5 size, plus the dense '
            f'targets of the fresh fitness samples and the probe; seq_len {SEARCH_SEQ}, bf16. Not modelled: '
            'stitching / database reads, optimizer steps, Composer start-up per fit. Memory per rank: 16 bytes per '
            'level-5 parameter (fp32 params, grads, Adam m, v) sharded over 8, the bf16 dense model sharded, one '
            'micro-batch\'s activations (4 x 1024 tokens, the search\'s 34 x hidden x layers + 8 x vocab rule, not '
            'sharded) and the fp32 dense log-prob cache of one generation\'s fitness + probe tokens (full vocabulary; '
            'topk_kl shrinks it).']
    return '\n'.join(out) + '\n'


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', help='hidden-512 shapes and few tokens: a 1-minute smoke test')
    ap.add_argument('--sequences', type=int, default=16)
    ap.add_argument('--seq-len', type=int, default=512)
    ap.add_argument('--out', default='bench/results/scale_plan')
    ap.add_argument('--replan', metavar='JSON', help='recompute the plan from the layers measured in a '
                    'scale_plan.json (new assumptions, no re-measuring)')
    ap.add_argument('--reuse', action='store_true', help='reuse the layer_<name>.json an earlier run left in --out')
    ap.add_argument('--child', help=argparse.SUPPRESS)
    args = ap.parse_args()
    global ARCH
    shapes = QUICK if args.quick else ARCH
    if args.quick:
        args.sequences, args.seq_len = min(args.sequences, 8), min(args.seq_len, 128)
    if args.child:
        print(json.dumps(measure_layer(args.child, shapes[args.child], args.sequences, args.seq_len)))
        return
    import torch
    t0 = time.perf_counter()
    n = 1024 if args.quick else 4096
    if args.replan:
        with open(args.replan) as f:
            res = {k: v for k, v in json.load(f).items() if k in ('gemm_fp32', 'gemm_fp64', 'threads', 'load',
                                                                  'layers', 'elapsed_s', 'reused')}
    else:
        res = {'gemm_fp32': gemm(n, 'float32'), 'gemm_fp64': gemm(n, 'float64'), 'threads': torch.get_num_threads(),
               'load': round(os.getloadavg()[0], 1), 'layers': {}}
    for name in () if args.replan else ('7b', '8b'):
        cmd = [sys.executable, __file__, '--child', name, '--sequences', str(args.sequences),
               '--seq-len', str(args.seq_len)] + (['--quick'] if args.quick else [])
        saved = os.path.join(args.out, 'quick' if args.quick else '', f'layer_{name}.json')
        if args.reuse and os.path.exists(saved):  # a layer measured by an earlier (interrupted) run
            with open(saved) as f:
                res['layers'][name] = r = json.load(f)
            res.setdefault('reused', []).append(name)
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:  # -9: killed, most likely for memory on a shared machine
                sys.exit(f'layer {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}{proc.stdout[-500:]}')
            res['layers'][name] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            os.makedirs(os.path.dirname(saved), exist_ok=True)
            with open(saved, 'w') as f:
                json.dump(r, f, indent=1)
        print(f'{name}: {r["tokens"]} tokens, CPU {r["cpu_norm_s"]:.1f} s (wall {r["wall_s"]:.1f} s, shared CPU), '
              f'phases {({k: round(v, 1) for k, v in r["phases_cpu_norm_s"].items()})}, peak RSS '
              f'{r["build_peak_rss_gb"]:.2f} GB, database {r["db_bytes"] / 1e6:.1f} MB', flush=True)
    if args.quick:  # the plan's ratios need the real shapes; map the quick layers onto them for a smoke test
        ARCH = {**ARCH, '7b': QUICK['7b'][:5] + (32,), '8b': QUICK['8b'][:5] + (32,)}
    L = res['layers']
    res['check'] = {'mlp_solve_ratio': L['8b']['solve_cpu_norm_s']['mlp'] / L['7b']['solve_cpu_norm_s']['mlp'],
                    'mlp_cube_ratio': (ARCH['8b'][3] / ARCH['7b'][3]) ** 3,
                    'db_formula_7b': db_bytes_formula(ARCH['7b']),
                    'db_measured_7b': sum(L['7b']['unit_bytes'].values())}
    res['plan'] = plan(L, res['gemm_fp64']['cpu_gflops'])
    res['assumptions'] = {'h100_peak_flops': H100, 'efficiency': EFF, 'calibration_paper': CALIB_PAPER,
                          'search_seq_len': SEARCH_SEQ, 'database_dtype': STORE_DTYPE}
    res.setdefault('elapsed_s', time.perf_counter() - t0)
    cmd = 'python bench/scale_plan.py' + (' --quick' if args.quick else '')
    out = os.path.join(args.out, 'quick') if args.quick else args.out  # a smoke test never overwrites the real run
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'scale_plan.json'), 'w') as f:
        json.dump(res, f, indent=1)
    md = markdown(res, cmd)
    with open(os.path.join(out, 'README.md'), 'w') as f:
        f.write(md)
    print(md)
    p, ph = res['plan'], L['7b']['phases_cpu_norm_s']
    print(f'layer7b_db_seconds={L["7b"]["cpu_norm_s"]:.1f} layer8b_db_seconds={L["8b"]["cpu_norm_s"]:.1f} '
          f'layer7b_db_mb={L["7b"]["db_bytes"] / 1e6:.1f} '
          f'layer7b_peak_rss_gb={L["7b"]["build_peak_rss_gb"] + L["7b"]["untied_head_gb"]:.2f} '
          f'layer7b_solve_over_calibration={ph["solve"] / (ph["forward"] + ph["hessian"]):.2f} '
          f'gemm_gflops={res["gemm_fp32"]["cpu_gflops"]:.1f} db7b_h100_hours={p["7b"]["db_h100_hours_1gpu"]:.2f} '
          f'db70b_h100_hours={p["70b"]["db_h100_hours_1gpu"]:.2f} '
          f'search7b_h100_hours_8gpu={p["7b"]["search_h100_hours_200gen_8gpu"]:.1f} '
          f'search70b_h100_hours_8gpu={p["70b"]["search_h100_hours_200gen_8gpu"]:.1f}')


if __name__ == '__main__':
    main()
