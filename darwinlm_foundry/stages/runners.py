"""The registry of stage kinds: kind -> the function that runs a stage of that kind.

Every runner is called as ``runner(cfg, stage_dir, refs, run, outputs)`` and returns its outputs (paths) for
later stages to name. Each kind lives in its own module (stages/data.py, database.py, search.py, train.py,
eval.py); none of them imports this registry.
"""

from darwinlm_foundry.stages.data import run_data, run_model, run_pretrain
from darwinlm_foundry.stages.database import run_database
from darwinlm_foundry.stages.eval import run_eval_stage, run_export_stage
from darwinlm_foundry.stages.search import run_search_stage
from darwinlm_foundry.stages.train import run_train

RUNNERS = {'data': run_data, 'pretrain': run_pretrain, 'model': run_model, 'database': run_database,
           'search': run_search_stage, 'train': run_train, 'eval': run_eval_stage, 'export': run_export_stage}
