"""TIAR keeps the temporal features closer to FP than block reconstruction; the TIB stays frozen afterwards."""

from __future__ import annotations

import torch
from tests.tfmq.common import CALIB, RECON, SAMPLER, quant_config

from tadq import api
from tadq.calibration.reconstruction import _run_fields, _run_key, reconstruct
from tadq.config import QuantConfig
from tadq.quant.quantizer import quantizers_bypassed
from tadq.registry import adapter_for
from tadq.tfmq import TemporalInformationBlock, deployment_grid
from tadq.tfmq.tiar import feature_disturbance


def _cosines(qmodel, fp_model, timesteps) -> list[float]:
    """Per temporal feature, mean cosine similarity to FP over the grid (weights only: activations bypassed)."""
    fp_tib = TemporalInformationBlock(fp_model, adapter_for(fp_model))
    with torch.no_grad():
        targets = fp_tib(timesteps)
    with quantizers_bypassed(qmodel.model, "activation"):
        scores = feature_disturbance(TemporalInformationBlock(qmodel.model, qmodel.adapter), targets, timesteps, None)
    return [1 - score["cosine_distance"] for score in scores]


def test_tiar_beats_block_reconstruction_on_temporal_features_at_w4(tiny_setup, build_tfmq):
    model, sched, calib = tiny_setup
    timesteps = deployment_grid(sched, SAMPLER)
    plain = _cosines(api.quantize(model, sched, quant_config("W4A8"), calibration=calib, progress=False), model,
                     timesteps)
    tiar = _cosines(build_tfmq(fsc="off"), model, timesteps)
    assert sum(tiar) / len(tiar) > sum(plain) / len(plain)
    assert all(a >= b for a, b in zip(tiar, plain, strict=True))
    report = build_tfmq(fsc="off").corrections[0].report["tiar"]
    assert report["kept_learned"] and report["loss_after"] < report["loss_before"]


def test_frozen_layers_are_not_learned_by_block_reconstruction(tiny_setup):
    model, sched, calib = tiny_setup
    qmodel = api.quantize(model, sched, QuantConfig.from_preset("W4A8", calibration=CALIB), calibration=calib,
                          progress=False)
    tib = TemporalInformationBlock(qmodel.model, qmodel.adapter)
    state = {k: v.clone() for k, v in qmodel.model.state_dict().items()}
    reports = reconstruct(qmodel.model, model, qmodel.adapter, calib, RECON, progress=False,
                          frozen_layers=tib.layer_names)
    assert "time_embedding" not in {r.unit for r in reports}  # made only of frozen layers: skipped
    after = qmodel.model.state_dict()
    frozen = [k for k in state if any(k.startswith(f"{layer}.") for layer in tib.layer_names)]
    assert frozen and all(torch.equal(state[k], after[k]) for k in frozen)
    conv = "down_blocks.0.resnets.0.conv1.weight"
    assert not torch.equal(state[conv], after[conv])  # the rest of the block was reconstructed
    assert not any(hasattr(m, "_tadq_reconstruction_frozen") for m in qmodel.model.modules())  # scoped


def test_frozen_layers_change_the_checkpoint_key(tiny_setup):
    model, sched, calib = tiny_setup
    qmodel = api.quantize(model, sched, quant_config("W4A8"), calibration=calib, progress=False)
    plain = _run_fields(qmodel.model, model, RECON, calib, ["a", "b"])
    assert plain == _run_fields(qmodel.model, model, RECON, calib, ["a", "b"], ())
    assert _run_key(plain) != _run_key(_run_fields(qmodel.model, model, RECON, calib, ["a", "b"], ("a.x",)))
