"""The `database` run stage: calibration Hessians and the OBS level database for the stage's input model."""

import os

from darwinlm_foundry.stages.common import base_model
from darwinlm_foundry.utils.checkpoints import load_hf_model
from darwinlm_foundry.utils.config import from_mapping


def run_database(cfg, stage_dir, refs, run, outputs):
    from darwinlm_foundry.algorithms.darwinlm_prune import CalibrationConfig, build_or_open_database
    calibration = from_mapping(CalibrationConfig, {'shards': refs['data']['shards'], **cfg.calibration},
                               'database.calibration')
    model_dir = refs['model']['model']
    model = load_hf_model(model_dir)
    db_dir = os.path.join(stage_dir, 'database')
    build_or_open_database(model, db_dir, calibration, model_name=model_dir)
    return {'database': os.path.abspath(db_dir), 'model': model_dir, 'base_model': base_model(refs)}
