"""The TFMQ rows of ``tadq run``: one reconstruction per preset, variants and PTQD on the very same weights."""

from __future__ import annotations

import pytest
from tests.tfmq.common import CALIB, SAMPLER, tfmq_config

import tadq.experiments.rows.tfmq as tfmq_rows
from tadq.config import ReconstructionConfig
from tadq.experiments.run import RunConfig, run_main_job


@pytest.mark.slow  # ≈ 45 s; the TFMQ method itself is tested in tests/tfmq, the run harness's rows in test_run.py
def test_tfmq_rows_run_end_to_end_on_one_reconstruction(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(tfmq_rows, "tfmq_config", lambda config: tfmq_config(seed=config.calibration.seed))
    methods = ("tfmq", "tfmq-model", "tfmq-select", "tfmq+ptqd", "qdiffusion+cache", "tfmq+tac+tcec", "tfmq-model+tac")
    config = RunConfig(model=str(tiny_model_dir), presets=("W4A8",), methods=methods, num_samples=4, sampler=SAMPLER,
                       eval_seed=1, calibration=CALIB, batch_size=8,
                       reconstruction=ReconstructionConfig(weight_iters=5, activation_iters=5, batch_size=8),
                       out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), grid_samples=4)
    results = run_main_job(config)
    rows = {row["method"]: row for row in results["rows"]}
    assert {"TFMQ-DM", "TFMQ-DM, model-wide FSC", "TFMQ-DM + selection", "TFMQ-DM + PTQD",
            "Q-Diffusion + FP cache"} <= set(rows)
    assert all(rows[name]["final_mse"] > 0 and rows[name]["setup_s"] > 0 for name in rows if name != "FP")
    models = sorted(p.name for p in (tmp_path / "run" / "models").iterdir() if p.is_dir())
    assert len(models) == 2  # the Q-Diffusion model and one TFMQ reconstruction: every other row reuses one of them
    extras = results["extras"]["TFMQ-DM + selection W4A8"]["tfmq"]
    assert {"tiar", "disturbance", "cache_bytes"} <= set(extras)
    assert "ptqd_tables" in results["extras"]["TFMQ-DM + PTQD W4A8"]
    stacked = results["extras"]["TFMQ-DM + TAC + TCEC W4A8"]["correction_tables"]
    assert set(stacked) == {"1:TAC", "2:TCEC"}  # behind the TFMQ member, which stays first
    model_wide = results["extras"]["TFMQ-DM, model-wide FSC + TAC W4A8"]["correction_tables"]
    assert set(model_wide) == {"1:TAC"}  # TAC fitted behind the model-wide FSC member, on the same reconstruction
    assert rows["TFMQ-DM, model-wide FSC + TAC"]["final_mse"] != rows["TFMQ-DM + TAC + TCEC"]["final_mse"]
