"""Build a sparsity database under ``composer -n N`` (CPU, gloo) the way the algorithm / database stage does.

Usage: ``composer -n 2 tests/obs/_database_dist.py <model_dir> <shards> <db_dir>``: every rank calibrates on its
share of the sequences, Hessians are summed across ranks, unit solves are spread over ranks, rank 0 writes.
"""

import sys

import torch


def main(model_dir: str, shards: str, db_dir: str) -> None:
    torch.set_num_threads(1)
    from composer.utils import dist
    dist.initialize_dist('cpu')

    from darwinlm_foundry.algorithms.darwinlm_prune import CalibrationConfig, build_or_open_database
    from darwinlm_foundry.utils.checkpoints import load_hf_model

    model = load_hf_model(model_dir)
    build_or_open_database(model, db_dir, CalibrationConfig(shards=shards, num_sequences=16, seq_len=64,
                                                            batch_size=4, mlp_multiple=8))
    dist.barrier()


if __name__ == '__main__':
    main(*sys.argv[1:4])
