"""``tadq.load_pipeline(...)(...)`` called the ways diffusers users call a pipeline: every argument does what the
diffusers pipeline does with it or is refused, by name, before any sampling; decoding and output types are
diffusers' own; ``save_pipeline`` refuses a source folder that is not the quantized model's before writing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tests.pipelines.builders import with_scheduler

import tadq
from tadq.pipelines import PromptConditions, load_fp_pipeline, save_pipeline
from tadq.pipelines.components import PipelineFolderError
from tadq.recipe import Deployment, Recipe
from tadq.sampling import SamplerConfig
from tadq.sampling.noise import initial_noise

STEPS, GUIDANCE = 2, 3.0
SAMPLER = SamplerConfig("ddim", num_steps=STEPS, eta=0.0)
CALL = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "progress": False}


def _quantized(folder):
    """Naive W8A8 of the folder's UNet on two prompts, DDIM 2 steps (no corrections: any call settings are taken)."""
    recipe = Recipe.from_preset("W8A8")
    calibration = dataclasses.replace(recipe.calibration, sampler=SAMPLER, num_trajectories=2, num_steps_kept=STEPS,
                                      samples_per_step=2)
    recipe = dataclasses.replace(recipe, calibration=calibration,
                                 deployments=(Deployment(sampler=SAMPLER, guidance_scale=GUIDANCE),))
    pipe = load_fp_pipeline(folder)
    return tadq.quantize(pipe.unet, pipe.scheduler, recipe, conditions=PromptConditions(pipe, ["a cat", "a dog"]),
                         progress=False)


@pytest.fixture(scope="module")
def sd_art(sd_folder, condition_adapter, tmp_path_factory):
    torch.set_num_threads(1)
    qmodel = _quantized(sd_folder)
    out = tmp_path_factory.mktemp("call-semantics") / "sd-w8a8"
    save_pipeline(qmodel, sd_folder, out)
    return qmodel, out


@pytest.fixture(scope="module")
def pipe(sd_art):
    return tadq.load_pipeline(sd_art[1])


def _no_sampling(pipe, monkeypatch):
    """Make sampling fail loudly, so a refusal is shown to come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampled before refusing")
    monkeypatch.setattr(pipe, "tadq_latents", refuse)


# ------------------------------------------------------------------------------------------ defects found and fixed


@pytest.mark.parametrize("name", ["foo", "negative_promt", "num_inference_step"])
def test_a_keyword_no_pipeline_takes_is_refused_even_when_none(pipe, monkeypatch, name):
    """A misspelt keyword (``negative_promt=None`` from a config, ``foo=None``) was accepted and ignored because
    only non-None extras were refused; Python (and diffusers' SD3 / Flux) refuse an unexpected keyword whatever its
    value. A diffusers argument at None (its own default) is still taken."""
    _no_sampling(pipe, monkeypatch)
    with pytest.raises(TypeError, match=rf"unexpected keyword argument\(s\) \['{name}'\]"):
        pipe("a cat", **{name: None}, **CALL)
    monkeypatch.undo()
    assert pipe("a cat", prompt_embeds=None, latents=None, output_type="latent", **CALL).images.shape == (1, 4, 8, 8)


def test_a_negative_prompt_list_is_counted_against_the_prompts_given(pipe, monkeypatch):
    """``pipe(["a", "b"], negative_prompt=["x"], num_images_per_prompt=2)`` said "2 negative prompts for 4
    prompts" (the counts after tadq repeated both); the caller gave 1 for 2. A ``None`` inside the list became the
    empty prompt silently (SDXL: zeros); diffusers fails on it. Both are refused before sampling."""
    _no_sampling(pipe, monkeypatch)
    with pytest.raises(ValueError, match="^1 negative prompts for 2 prompts"):
        pipe(["a cat", "a dog"], negative_prompt=["blurry"], num_images_per_prompt=2, **CALL)
    with pytest.raises(TypeError, match="negative prompt must be a str, got NoneType"):
        pipe(["a cat", "a dog"], negative_prompt=["blurry", None], **CALL)


def test_a_used_generator_is_refused_instead_of_repeating_the_images(pipe):
    """tadq draws every sample's noise from the generator's initial seed and the sample index. A generator reused
    across calls (``g = torch.Generator().manual_seed(0)``, then ``pipe(p, generator=g)`` in a loop: diffusers gives
    new images each time) gave the first call's images again, silently. Now a call consumes the generator and a
    generator not in its freshly seeded state is refused, naming the fix; a refused call consumes nothing."""
    generator = torch.Generator().manual_seed(4)
    first = pipe("a cat", generator=generator, output_type="latent", **CALL).images
    assert torch.equal(first, pipe("a cat", seed=4, output_type="latent", **CALL).images)
    with pytest.raises(ValueError, match=r"drawn from since manual_seed\(4\).*Seed it again"):
        pipe("a cat", generator=generator, output_type="latent", **CALL)
    drawn = torch.Generator().manual_seed(4)
    torch.randn(3, generator=drawn)  # used by the caller's own code first
    with pytest.raises(ValueError, match="drawn from since"):
        pipe("a cat", generator=drawn, **CALL)
    fresh = torch.Generator().manual_seed(4)
    with pytest.raises(ValueError, match="tokens long"):
        pipe(" ".join(["cat"] * 40), generator=fresh, **CALL)
    assert torch.equal(pipe("a cat", generator=fresh, output_type="latent", **CALL).images, first)
    again = pipe("a cat", generator=generator.manual_seed(4), output_type="latent", **CALL).images
    assert torch.equal(again, first)  # seeded again: the same images, as diffusers gives


@pytest.mark.parametrize(("name", "sampler"), [
    ("EulerAncestralDiscreteScheduler", SamplerConfig("euler-ancestral", STEPS)),
    ("DPMSolverMultistepScheduler", SamplerConfig("dpmsolver++", STEPS)),
])
def test_a_replaced_scheduler_chooses_the_sampler_as_in_diffusers(pipe, sd_art, name, sampler):
    """``pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)`` (diffusers' way to
    choose a sampler) was ignored: the call sampled the recipe's DDIM, without a word. The replacement's sampler
    now runs (as tadq.sample with it); one tadq has no sampler for is refused by name before sampling."""
    import diffusers

    loaded = pipe.scheduler
    ddim = pipe("a cat", seed=1, output_type="latent", **CALL).images
    try:
        pipe.scheduler = getattr(diffusers, name).from_config(loaded.config)
        got = pipe("a cat", seed=1, output_type="latent", **CALL).images
        expected = tadq.sample(sd_art[0], pipe.scheduler, sampler, num_samples=1, seed=1, progress=False,
                               conditions=PromptConditions(pipe, ["a cat"]), guidance_scale=GUIDANCE).images
        assert torch.equal(got, expected) and not torch.equal(got, ddim)
        for refused in ("UniPCMultistepScheduler", "PNDMScheduler"):
            pipe.scheduler = getattr(diffusers, refused).from_config(loaded.config)
            with pytest.raises(NotImplementedError, match=f"pipe.scheduler was replaced by a {refused}"):
                pipe("a cat", **CALL)
    finally:
        pipe.scheduler = loaded
    assert torch.equal(pipe("a cat", seed=1, output_type="latent", **CALL).images, ddim)


@pytest.mark.parametrize(("name", "options", "sampler"), [
    ("EulerDiscreteScheduler", {}, SamplerConfig("euler", STEPS)),
    ("EulerAncestralDiscreteScheduler", {}, SamplerConfig("euler-ancestral", STEPS)),
    ("DPMSolverMultistepScheduler", {"solver_order": 1}, SamplerConfig("dpmsolver++", STEPS, order=1)),
    ("PNDMScheduler", {}, SamplerConfig("ddim", STEPS, eta=0.0)),  # no tadq sampler of its own: DDIM
])
def test_an_fp_unet_folder_samples_with_its_schedulers_own_sampler(sd_folder, condition_adapter, tmp_path, name,
                                                                   options, sampler):
    """An FP Stable Diffusion folder (no recipe) was sampled with DDIM whatever its scheduler (an SDXL folder's
    Euler, an Euler-ancestral or DPM-Solver++ folder), where diffusers' pipeline runs the scheduler it ships and
    docs/pipelines.md promised "the sampler its scheduler names, else DDIM" (as the transformer pipelines did).
    It now samples as ``default_sampler`` maps the class (DDIM where there is none, PNDM)."""
    import diffusers

    scheduler = getattr(diffusers, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, **options)
    pipe = tadq.load_pipeline(with_scheduler(sd_folder, tmp_path / "sd", scheduler))
    got = pipe("a cat", seed=1, output_type="latent", **CALL).images
    expected = tadq.sample(pipe.unet, pipe.scheduler, sampler, num_samples=1, seed=1, progress=False,
                           conditions=PromptConditions(pipe, ["a cat"]), guidance_scale=GUIDANCE).images
    assert torch.equal(got, expected)
    if sampler.kind != "ddim":
        ddim = tadq.sample(pipe.unet, pipe.scheduler, SAMPLER, num_samples=1, seed=1, progress=False,
                           conditions=PromptConditions(pipe, ["a cat"]), guidance_scale=GUIDANCE).images
        assert not torch.equal(got, ddim)


def test_numpy_integers_are_taken_and_floats_refused(pipe):
    """Counts and seeds from NumPy (``np.int64`` out of a config or a sweep) were refused as "not a positive int"
    / "must be a int"; diffusers takes them. They now sample as the Python ints; floats and bools are refused as
    TypeError naming the argument."""
    expected = pipe("a cat", num_images_per_prompt=2, seed=3, output_type="latent", **CALL).images
    call = {**CALL, "num_inference_steps": np.int64(STEPS)}
    got = pipe("a cat", num_images_per_prompt=np.int32(2), seed=np.uint32(3), batch_size=np.int64(1),
               output_type="latent", **call).images
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for name, value in (("num_inference_steps", 2.0), ("num_images_per_prompt", True), ("seed", 3.0),
                        ("batch_size", "8")):
        with pytest.raises(TypeError, match=f"{name} must be an int"):
            pipe("a cat", **{**CALL, name: value})


def test_set_progress_bar_config_disable_silences_the_sampling_bar(sd_folder, condition_adapter, capfd):
    """``pipe.set_progress_bar_config(disable=True)`` (how diffusers users silence a pipeline) was ignored: tadq's
    ``progress`` defaulted to on. It is now the default; ``progress=`` still decides when given."""
    fp = tadq.load_pipeline(sd_folder)
    call = {"num_inference_steps": STEPS, "output_type": "latent"}
    capfd.readouterr()
    fp("a cat", **call)
    assert "sampling" in capfd.readouterr().err
    fp.set_progress_bar_config(disable=True)
    fp("a cat", **call)
    assert "sampling" not in capfd.readouterr().err
    fp("a cat", progress=True, **call)
    assert "sampling" in capfd.readouterr().err


def test_save_pipeline_refuses_a_source_that_is_not_the_models_before_writing(sd_art, sd_folder, sdxl_folder,
                                                                              tmp_path):
    """``save_pipeline(sd_qmodel, sdxl_folder, out)`` wrote an artefact pairing the SD UNet with SDXL's text
    encoders; loading it then failed with "hidden_size 16 + 16 does not match the UNet's cross_attention_dim 16"
    (a folder that is not from one model, after it was written). Now the source's denoiser config is compared
    with the model's first, and nothing is written."""
    qmodel, art = sd_art
    out = tmp_path / "mixed"
    with pytest.raises(PipelineFolderError, match=r"unet/config\.json does not describe the quantized model"):
        save_pipeline(qmodel, sdxl_folder, out)
    assert not out.exists()
    reloaded, _ = tadq.load(art)  # a reloaded artefact's model (its config read back from JSON) matches its source
    save_pipeline(reloaded, sd_folder, tmp_path / "again")
    assert (tmp_path / "again" / "unet" / "config.json").read_bytes() == (art / "unet" / "config.json").read_bytes()


def test_numpy_scales_are_numbers_and_strings_are_refused(pipe, caplog):
    """``guidance_scale=np.float32(5)`` was refused as "must be a finite float >= 0 ..., got np.float32(5.0)" (a
    number >= 0), while ``eta="0.3"`` was converted from the string silently. NumPy reals now sample as the float,
    anything that is not a number is a TypeError naming the argument. A negative prompt that guidance 1 leaves
    unused (as diffusers does) is said so in the log, not dropped silently."""
    expected = pipe("a cat", seed=1, output_type="latent", **{**CALL, "guidance_scale": 5.0, "eta": 0.25}).images
    numpy_scales = {**CALL, "guidance_scale": np.float32(5), "eta": np.float64(0.25)}
    got = pipe("a cat", seed=1, output_type="latent", **numpy_scales)
    assert torch.equal(got.images, expected)
    for name, value in (("guidance_scale", torch.tensor(5.0)), ("eta", "0.3"), ("guidance_scale", True)):
        with pytest.raises(TypeError, match=f"{name} must be a number"):
            pipe("a cat", **{**CALL, name: value})
    with caplog.at_level("WARNING", logger="tadq.pipelines.quantized"):
        pipe("a cat", negative_prompt="blurry", output_type="latent", **{**CALL, "guidance_scale": 1})
    assert "negative_prompt is not used: guidance_scale=1" in caplog.text


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    from tests.pipelines.builders_transformer import build_flux

    return build_flux(tmp_path_factory.mktemp("call-semantics-flux") / "flux")


@pytest.mark.parametrize("value", [0.5, 0.0, -1.0, float("nan"), float("inf")])
def test_flux_true_cfg_scale_is_refused_by_its_own_name(flux_folder, value):
    """Flux's classifier-free scale is ``true_cfg_scale``; ``true_cfg_scale=0.5`` was refused as "guidance_scale=0.5:
    ..." (NaN and inf as "guidance_scale must be a finite float"), naming the argument the caller used for the
    distilled scale. The refusal now names ``true_cfg_scale``."""
    flux = tadq.load_pipeline(flux_folder)
    with pytest.raises(ValueError, match=r"^true_cfg_scale="):
        flux("a cat", true_cfg_scale=value, negative_prompt="", num_inference_steps=STEPS, progress=False)


def test_an_fp16_vae_is_back_in_fp16_when_decoding_fails(sd_folder, condition_adapter, monkeypatch):
    """An fp16 VAE with ``force_upcast`` is decoded in float32 (as diffusers); a decode that raised (out of memory)
    left it in float32 for good, doubling its memory for every later call. It is put back in a ``finally``."""
    fp = tadq.load_pipeline(sd_folder)
    fp.vae.to(torch.float16)
    assert fp.vae.config.force_upcast

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(fp.vae, "decode", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        fp.tadq_decode(torch.zeros(1, 4, 8, 8), "np")
    assert fp.vae.dtype == torch.float16


# --- behaviour that is right today ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_fp_pipeline_outputs_are_diffusers_own_from_the_same_noise(which, sd_folder, sdxl_folder, condition_adapter):
    """Pins: the FP folder through tadq gives diffusers' latents from the same noise (within a float32 bound of a
    few ulps per step), decodes them exactly as diffusers does (tadq's decode of diffusers' latents equals
    diffusers' images for pil, np and pt), and returns diffusers' output classes and ``return_dict=False``
    tuples."""
    torch.set_num_threads(1)
    fp = tadq.load_pipeline(sd_folder if which == "sd" else sdxl_folder)
    base = type(fp).tadq_base
    prompts = ["a cat", "a red dog"]
    call = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "negative_prompt": ["blurry", "dark"]}
    ours = fp(prompts, seed=5, output_type="latent", progress=False, **call).images
    noise = initial_noise(5, range(len(prompts)), ours.shape[1:])
    theirs = base.__call__(fp, prompts, latents=noise.clone(), output_type="latent", **call).images
    tolerance = 16 * STEPS * torch.finfo(torch.float32).eps * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)
    for output_type in ("np", "pt", "pil"):
        reference = base.__call__(fp, prompts, latents=noise.clone(), output_type=output_type, **call)
        mine = fp(prompts, seed=5, output_type=output_type, progress=False, **call)
        assert type(mine) is type(reference)
        decoded = fp.tadq_decode(theirs, output_type)
        if output_type == "pil":
            assert [im.size for im in mine.images] == [im.size for im in reference.images]
            decoded, reference_images = ([np.asarray(im) for im in ims] for ims in (decoded, reference.images))
            assert all(np.array_equal(a, b) for a, b in zip(decoded, reference_images, strict=True))
        else:
            assert type(mine.images) is type(reference.images) and mine.images.shape == reference.images.shape
            assert np.array_equal(np.asarray(decoded), np.asarray(reference.images))
            assert 0 <= float(mine.images.min()) and float(mine.images.max()) <= 1
    tuple_theirs = base.__call__(fp, prompts, latents=noise.clone(), output_type="latent", return_dict=False, **call)
    tuple_ours = fp(prompts, seed=5, output_type="latent", return_dict=False, progress=False, **call)
    assert isinstance(tuple_ours, tuple) and len(tuple_ours) == len(tuple_theirs)
    assert tuple_ours[1:] == tuple_theirs[1:]  # SD: (images, nsfw None); SDXL: (images,)


def test_same_seed_same_images_across_calls_and_batch_sizes(pipe):
    """Pins: a call is reproducible, and sample i's latents do not depend on the batch size (its noise is drawn
    from (seed, i); the float kernels may differ by batch in general, README "What the batch size changes", so the
    bound is a few float32 ulps per step)."""
    prompts = ["a cat", "a dog", "a red car"]
    kwargs = {"seed": 9, "output_type": "latent", "num_images_per_prompt": 2, **CALL}
    one = pipe(prompts, batch_size=1, **kwargs).images
    assert torch.equal(one, pipe(prompts, batch_size=1, **kwargs).images)
    many = pipe(prompts, batch_size=4, **kwargs).images
    torch.testing.assert_close(many, one, rtol=0,
                               atol=16 * STEPS * torch.finfo(torch.float32).eps * float(one.abs().max()))
    assert not torch.equal(one[0], one[1])  # two images of one prompt: two noises
