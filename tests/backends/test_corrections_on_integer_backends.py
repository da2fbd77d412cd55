"""The sampler-level corrections (PTQD, TAC, TCEC, TAC + TCEC) on the integer backends (docs/backends.md: "the
correction stack" is kept by the converted model; src/tadq/corrections/README.md).

A stack fitted on the fake-quant model, saved and loaded with ``backend="int8"`` / ``"int8-compiled"`` must carry
the very same tables and hooks, act, agree with the fake model's samples from the same noise (median PSNR, as
tests/backends/test_model.py measures it), and be refused under another sampler before any network call, as on
fake. A stack fitted *on* an integer model must stay an integer model, and a stack fitted on a model with guidance
branch ranges must keep that model's calibrated unconditional ranges.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from tests.backends.machine import int8_reason, needs_compiled, needs_int8_w8
from tests.conftest import build_tiny_unet, counting_forwards
from typer.testing import CliRunner

import tadq
from tadq import api
from tadq.backends import IntegerDenoiser, to_backend
from tadq.cli.app import app
from tadq.config import CalibrationConfig, QuantConfig
from tadq.corrections import PTQDConfig, TACConfig, TCECConfig
from tadq.corrections.attach import fit_corrections
from tadq.metrics.image import psnr_per_sample
from tadq.sampling import RandomClassLabels, SamplerConfig

pytestmark = pytest.mark.skipif(int8_reason() is not None, reason=f"int8 CPU backend: {int8_reason()}")

SAMPLER = SamplerConfig(kind="ddim", num_steps=4, eta=1.0)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)
N = 8  # fitting trajectories
MIN_PSNR_DB = 40.0  # tests/backends/test_model.py: same arithmetic up to accumulation order, judged by the median


def _stack(name: str) -> list:
    tac, ptqd = TACConfig(num_samples=N, seed=1), PTQDConfig(num_samples=N, seed=1)
    tcec = TCECConfig(num_samples=N, seed=1, selection_samples=N)
    return {"ptqd": [ptqd], "tac+tcec": [tac, tcec]}[name]


def _agree(images: torch.Tensor, reference: torch.Tensor) -> bool:
    return bool(psnr_per_sample(images, reference).median() >= MIN_PSNR_DB)


def _images(model, scheduler, sampler: SamplerConfig = SAMPLER, **kwargs) -> torch.Tensor:
    return api.sample(model, scheduler, sampler, num_samples=6, seed=5, progress=False, **kwargs).images


def _tables(model) -> dict[str, object]:
    return dict(model.corrections.state_dict())


def _same_tables(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


@pytest.fixture(scope="module")
def setup():
    """(FP UNet, scheduler, W4A8 naive fake-quant model): W4A8 runs on every int8 CPU, with or without VNNI."""
    torch.manual_seed(0)
    fp, scheduler = build_tiny_unet(), DDPMScheduler(num_train_timesteps=1000)
    base = api.quantize(fp, scheduler, QuantConfig.from_preset("W4A8", calibration=CALIB), progress=False)
    return fp, scheduler, base


_SAVED: dict[str, tuple] = {}


def _saved(setup, name: str, folder) -> tuple:
    """(fake corrected model, its artefact folder), fitted once per stack."""
    if name not in _SAVED:
        fp, scheduler, base = setup
        corrected = fit_corrections(base, fp, scheduler, SAMPLER, _stack(name), batch_size=N, progress=False)
        path = folder / name
        corrected.save_pretrained(path, scheduler)
        _SAVED[name] = corrected, path
    return _SAVED[name]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    return tmp_path_factory.mktemp("artefacts")


def _check_loaded(setup, corrected, path, backend: str) -> None:
    fp, scheduler, base = setup
    loaded, loaded_scheduler = tadq.load(path, backend=backend)
    assert isinstance(loaded, IntegerDenoiser) and loaded.backend == backend
    hooks = loaded.correction_hooks()
    assert [type(h) for h in hooks] == [type(h) for h in corrected.correction_hooks()]
    assert _same_tables(_tables(loaded), _tables(corrected))
    with_stack = _images(loaded, loaded_scheduler)
    # the stack acts (the eager int8 base: compiling a second model would double the compiled test's time)
    assert not torch.equal(with_stack, _images(to_backend(base, "int8"), scheduler))
    assert _agree(with_stack, _images(corrected, scheduler))
    for other in (SamplerConfig("ddim", 5, eta=1.0), SamplerConfig("ddim", 4, eta=0.0)):
        with counting_forwards(loaded.model) as calls, pytest.raises(ValueError, match="fitted for|refit"):
            _images(loaded, loaded_scheduler, other)
        assert calls[0] == 0, f"{other.key}: {calls[0]} network calls before the refusal"


@pytest.mark.parametrize("name", ["ptqd", "tac+tcec"])
def test_a_saved_stack_loaded_on_int8_acts_as_on_fake(setup, artefacts, name):
    corrected, path = _saved(setup, name, artefacts)
    _check_loaded(setup, corrected, path, "int8")


@pytest.mark.slow  # Inductor compiles the tiny UNet (~35 s here), as the other compiled sampling tests
@needs_compiled
def test_a_saved_stack_loaded_on_int8_compiled_acts_as_on_fake(setup, artefacts):
    corrected, path = _saved(setup, "tac+tcec", artefacts)
    _check_loaded(setup, corrected, path, "int8-compiled")


@needs_int8_w8
def test_ptqd_on_symmetric_8_bit_weights_agrees_on_int8(setup):
    fp, scheduler, _ = setup
    base = api.quantize(fp, scheduler, QuantConfig.from_preset("W8A8-WSYM", calibration=CALIB), progress=False)
    corrected = fit_corrections(base, fp, scheduler, SAMPLER, _stack("ptqd"), batch_size=N, progress=False)
    integer = to_backend(corrected, "int8")
    assert _same_tables(_tables(integer), _tables(corrected))
    assert _agree(_images(integer, scheduler), _images(corrected, scheduler))


def test_a_stack_fitted_on_an_integer_model_stays_an_integer_model(setup, tmp_path):
    """``fit_corrections`` on a converted model: the result used to be rebuilt as a plain ``QuantizedDenoiser``,
    which dropped the backend's attributes and let ``save_pretrained`` write the integer model as an artefact."""
    fp, scheduler, base = setup
    integer = to_backend(base, "int8")
    tac = TACConfig(num_samples=N, seed=1)
    corrected = fit_corrections(integer, fp, scheduler, SAMPLER, [tac], batch_size=N, progress=False)
    assert type(corrected) is type(integer) and corrected.backend == "int8" and corrected.layers == integer.layers
    assert corrected.model is integer.model and len(integer.corrections) == 0  # shared network, stack not touched
    # its recipe is the integer model's, with the stack it now carries (tests/corrections/test_attach.py)
    assert corrected.recipe == dataclasses.replace(integer.recipe, corrections=(tac,))
    assert integer.recipe.corrections == () and corrected.training == integer.training
    with pytest.raises(TypeError, match="save the 'fake' model"):
        corrected.save_pretrained(tmp_path / "never", scheduler)
    assert not (tmp_path / "never").exists()
    # fitted against integer arithmetic, the stack is the fake fit's up to accumulation order, judged as every
    # agreement here is: by the median sample. (Its tables are not compared element-wise: a few activation codes at a
    # rounding boundary flip between the backends on this random UNet, and on an AVX2 CPU, whose float kernels
    # reduce in another order, a TAC table entry moved by 0.0096 where rtol 1e-2 / atol 1e-3 had held on AVX-512.)
    on_fake = fit_corrections(base, fp, scheduler, SAMPLER, [TACConfig(num_samples=N, seed=1)], batch_size=N,
                              progress=False)
    assert _tables(on_fake).keys() == _tables(corrected).keys()
    assert _agree(_images(corrected, scheduler), _images(on_fake, scheduler))


GUIDANCE = 2.0
LABELS = RandomClassLabels(3, null_class=3)
GUIDED = SamplerConfig("ddpm", 4)


def test_a_guided_stack_keeps_the_branch_ranges_and_agrees_on_int8(tmp_path):
    """Class-conditional UNet, guidance 2, ``branch_ranges``: the corrected model must quantize the unconditional
    rows with the calibrated ranges (a fresh ``BranchRanges`` holds Δ = 1, z = 0), on fake and on int8."""
    model, scheduler = build_tiny_unet(num_class_embeds=4), DDPMScheduler(num_train_timesteps=1000)
    calibration = CalibrationConfig(sampler=GUIDED, num_trajectories=8, num_steps_kept=2, samples_per_step=4,
                                    batch_size=8)
    recipe = tadq.Recipe.from_preset("W4A8", calibration=calibration, branch_ranges=True,
                                     deployments=(tadq.Deployment(GUIDED, guidance_scale=GUIDANCE),))
    base = api.quantize(model, scheduler, recipe, conditions=LABELS, progress=False)
    corrected = fit_corrections(base, model, scheduler, GUIDED, [TACConfig(num_samples=N, seed=1)], batch_size=N,
                                conditions=LABELS, guidance_scale=GUIDANCE, progress=False)
    assert torch.equal(corrected.branch_ranges.scale, base.branch_ranges.scale)
    assert torch.equal(corrected.branch_ranges.zero_point, base.branch_ranges.zero_point)
    # tadq.quantize with the corrections in the recipe goes through the same view (tadq quantize's artefacts)
    in_one = api.quantize(model, scheduler, dataclasses.replace(recipe, corrections=(TACConfig(num_samples=N,
                                                                                              seed=1),)),
                          conditions=LABELS, fit_batch_size=N, progress=False)
    assert len(in_one.corrections) == 1 and torch.equal(in_one.branch_ranges.scale, base.branch_ranges.scale)
    kwargs = {"conditions": LABELS, "guidance_scale": GUIDANCE}
    corrected.save_pretrained(tmp_path / "guided", scheduler)
    loaded, loaded_scheduler = tadq.load(tmp_path / "guided", backend="int8")
    assert torch.equal(loaded.branch_ranges.scale, base.branch_ranges.scale)
    fake_images = _images(corrected, scheduler, GUIDED, **kwargs)
    assert not torch.equal(fake_images, _images(base, scheduler, GUIDED, **kwargs))
    assert _agree(_images(loaded, loaded_scheduler, GUIDED, **kwargs), fake_images)
    with counting_forwards(loaded.model) as calls, pytest.raises(ValueError, match="guidance scale"):
        _images(loaded, loaded_scheduler, GUIDED, conditions=LABELS, guidance_scale=3.0)
    assert calls[0] == 0


def test_cli_samples_a_corrected_artefact_on_int8_and_refuses_another_sampler(setup, artefacts, tmp_path):
    _, path = _saved(setup, "ptqd", artefacts)
    runner = CliRunner()
    common = [str(path), "--backend", "int8", "--num-samples", "2", "--threads", "1"]
    refused = runner.invoke(app, ["sample", *common, "--steps", "5", "--out", str(tmp_path / "no.png")])
    assert refused.exit_code == 2, refused.output
    assert "ddim-4-eta1.0" in refused.output and not (tmp_path / "no.png").exists()
    ran = runner.invoke(app, ["sample", *common, "--out", str(tmp_path / "yes.png")])
    assert ran.exit_code == 0, ran.output
    assert (tmp_path / "yes.png").is_file()


def test_bit_operations_of_an_integer_model_is_refused_not_zero(setup):
    """PTQD's cost measure counts nn.Conv2d/nn.Linear MACs; the integer layers are neither, so an int8 model
    counted 0 bit-operations without a word (mixed precision's low/high cost, the bench's bitops)."""
    from tadq.corrections.ptqd.bitops import bit_operations

    _, _, base = setup
    assert bit_operations(base) > 0
    with pytest.raises(ValueError, match="backend 'int8'.*fake-quant model"):
        bit_operations(to_backend(base, "int8"))


def test_converting_a_corrected_view_in_place_is_refused_while_its_base_lives(setup):
    """``fit_corrections`` returns a view on the base's network; ``inplace=True`` on either used to swap the shared
    layers, so the base (still a fake-quant ``QuantizedDenoiser``) silently ran int8 kernels."""
    fp, scheduler, base = setup
    corrected = fit_corrections(base, fp, scheduler, SAMPLER, [TACConfig(num_samples=N, seed=1)], batch_size=N,
                                progress=False)
    kinds = {type(m) for m in base.model.modules()}
    for model in (corrected, base):
        with pytest.raises(ValueError, match="shares its network"):
            to_backend(model, "int8", inplace=True)
    assert {type(m) for m in base.model.modules()} == kinds  # refused before any layer was swapped
    integer = to_backend(corrected, "int8")  # a converted copy is fine
    assert isinstance(integer, IntegerDenoiser) and integer.model is not base.model
    alone = api.quantize(fp, scheduler, QuantConfig.from_preset("W4A8", calibration=CALIB), progress=False)
    assert isinstance(to_backend(alone, "int8", inplace=True), IntegerDenoiser)  # nothing shares it
