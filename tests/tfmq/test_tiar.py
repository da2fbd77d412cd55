"""TIAR keeps the temporal features closer to FP than block reconstruction; the TIB stays frozen afterwards."""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers import DDPMScheduler
from tests.tfmq.common import CALIB, RECON, SAMPLER, quant_config, tfmq_config

from tadq import api
from tadq.calibration.reconstruction import _run_fields, _run_key, reconstruct
from tadq.config import QuantConfig
from tadq.quant.quantizer import quantizers_bypassed
from tadq.registry import adapter_for
from tadq.tfmq import TemporalInformationBlock, deployment_grid, quantize_tfmq
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
    """Against the base TFMQ-DM's claim was measured on: GPTQ's target shrunk toward zero (``gptq_target_prior=
    "zero"``, both builds). With the weight prior, the default since 2026-12-07, the plain base's temporal features
    are already the closer ones on this tiny model (mean cosine 0.999994 against TIAR's 0.999983), so TIAR's gain
    on that base is open (closing note of that day) and not asserted here."""
    model, sched, calib = tiny_setup
    timesteps = deployment_grid(sched, SAMPLER)
    config = QuantConfig.from_preset("W4A8", method="qdiffusion", calibration=CALIB,
                                     reconstruction=replace(RECON, gptq_target_prior="zero"), split_shortcut=True,
                                     quantize_attention=True)
    plain = _cosines(api.quantize(model, sched, config, calibration=calib, progress=False), model, timesteps)
    tiar = _cosines(quantize_tfmq(model, sched, config, tfmq_config(fsc="off"), SAMPLER, calibration=calib,
                                  progress=False), model, timesteps)
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


def test_tiar_holds_features_of_a_bounded_number_of_pairs(monkeypatch):
    """reconstruct_tib computed the FP targets (and the quantized features it scores) for every (step, label) pair
    at once: ≈ 39 GB each for DiT-XL/2's 50 steps × 1001 labels. Every TIB call now takes at most one training
    batch or one TARGET_CHUNK, and the result is the one of a chunk holding the whole set."""
    from tests.conftest import build_tiny_unet

    from tadq.config import ReconstructionConfig
    from tadq.prepare import build_quantized_structure
    from tadq.sampling import SamplerConfig
    from tadq.tfmq import TFMQConfig, tiar
    from tadq.tfmq.tib import grid_inputs

    torch.set_num_threads(1)
    model = build_tiny_unet(0, num_class_embeds=6)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    config = TFMQConfig(tiar_iters=20, tiar_batch_size=8)
    rows: list[int] = []
    original = TemporalInformationBlock.__call__

    def counted(self, t, labels=None):
        rows.append(t.shape[0])
        return original(self, t, labels)

    def run(chunk: int):
        monkeypatch.setattr(tiar, "TARGET_CHUNK", chunk, raising=False)
        qmodel = build_quantized_structure(model, QuantConfig.from_preset("W4A8", method="naive"))
        fp_tib = TemporalInformationBlock(model, adapter_for(model))
        q_tib = TemporalInformationBlock(qmodel.model, adapter_for(model))
        t, labels, _ = grid_inputs(deployment_grid(sched, SamplerConfig("ddim", num_steps=20)), fp_tib.num_labels)
        report = tiar.reconstruct_tib(q_tib, fp_tib, t, labels, ReconstructionConfig(), config)
        return report, [weight.detach().clone() for _, weight in q_tib.weight_pairs()], len(t)

    monkeypatch.setattr(TemporalInformationBlock, "__call__", counted)
    chunked, weights, pairs = run(16)
    assert pairs == 120 and max(rows) <= 16  # the whole set (120 pairs) was one call
    whole, whole_weights, _ = run(pairs)
    assert all(torch.equal(a, b) for a, b in zip(weights, whole_weights, strict=True))  # batches do not depend on it
    # a GEMM of 16 rows may round a feature otherwise than one of 120: float32 ulps, accumulated over the widest
    # TIB input and summed over the features' channels
    width = max(module.in_features for module in model.modules() if isinstance(module, torch.nn.Linear))
    tolerance = 4 * width * torch.finfo(torch.float32).eps
    for name in ("loss_before", "loss_after", "cosine_before", "cosine_after"):
        assert abs(getattr(chunked, name) - getattr(whole, name)) <= tolerance * abs(getattr(whole, name)), name
    assert chunked.kept_learned == whole.kept_learned
