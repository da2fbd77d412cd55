"""Quantized pipelines: naive W8A8 on prompts → an artefact that keeps the pipeline layout (FP components byte for
byte, loadable by diffusers) → ``tadq.load_pipeline`` returning the diffusers output, equal to tadq's own API from
the same seed."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import tadq
from tadq.fsguard import OutputRefused
from tadq.pipelines import PromptConditions, load_fp_pipeline, save_pipeline
from tadq.pipelines.quantized import resolve_deployment
from tadq.recipe import Deployment, Recipe
from tadq.sampling import SamplerConfig

STEPS, GUIDANCE = 3, 3.0
SAMPLER = SamplerConfig("ddim", num_steps=STEPS, eta=0.0)


def _recipe() -> Recipe:
    recipe = Recipe.from_preset("W8A8")
    calibration = dataclasses.replace(recipe.calibration, sampler=SAMPLER, num_trajectories=4, num_steps_kept=STEPS,
                                      samples_per_step=4)
    return dataclasses.replace(recipe, calibration=calibration,
                               deployments=(Deployment(sampler=SAMPLER, guidance_scale=GUIDANCE),))


def _quantize_and_save(folder, out):
    pipe = load_fp_pipeline(folder)
    conditions = PromptConditions(pipe, ["a cat", "a dog"])
    qmodel = tadq.quantize(pipe.unet, pipe.scheduler, _recipe(), conditions=conditions, progress=False)
    save_pipeline(qmodel, folder, out)
    return out


@pytest.fixture(scope="module")
def sd_artefact(sd_folder, condition_adapter, tmp_path_factory):
    return _quantize_and_save(sd_folder, tmp_path_factory.mktemp("art") / "sd-w8a8")


@pytest.fixture(scope="module")
def sdxl_artefact(sdxl_folder, condition_adapter, tmp_path_factory):
    return _quantize_and_save(sdxl_folder, tmp_path_factory.mktemp("art") / "sdxl-w8a8")


def _same_bytes(a, b) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def test_artefact_keeps_every_fp_component(sd_folder, sd_artefact, sdxl_folder, sdxl_artefact):
    for source, art in ((sd_folder, sd_artefact), (sdxl_folder, sdxl_artefact)):
        assert (art / "model_index.json").read_bytes() == (source / "model_index.json").read_bytes()
        index = json.loads((source / "model_index.json").read_text())
        components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and None not in v]
        for name in components:
            if name != "unet":
                assert _same_bytes(source / name, art / name), name
        assert sorted(p.name for p in (art / "unet").iterdir()) == ["config.json"]  # weights are tadq's codes
        assert (art / "tadq_weights.safetensors").is_file()
    text_encoder = CLIPTextModel.from_pretrained(sd_artefact / "text_encoder")
    assert isinstance(text_encoder, CLIPTextModel)
    assert isinstance(CLIPTextModelWithProjection.from_pretrained(sdxl_artefact / "text_encoder_2"),
                      CLIPTextModelWithProjection)
    assert isinstance(AutoencoderKL.from_pretrained(sd_artefact / "vae"), AutoencoderKL)
    assert CLIPTokenizer.from_pretrained(sdxl_artefact / "tokenizer_2").model_max_length > 0


def test_saving_refuses_a_foreign_folder_and_the_source(sd_folder, sd_artefact, tmp_path):
    qmodel, _ = tadq.load(sd_artefact)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputRefused, match="did not write"):
        save_pipeline(qmodel, sd_folder, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputRefused, match="input"):
        save_pipeline(qmodel, sd_folder, sd_folder / "inside")


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_load_pipeline_equals_tadq_sample_from_the_same_seed(which, sd_artefact, sdxl_artefact):
    art = sd_artefact if which == "sd" else sdxl_artefact
    pipe = tadq.load_pipeline(art)
    assert type(pipe).__name__.startswith("Tadq") and isinstance(pipe, type(pipe).tadq_base)
    output = pipe("a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=5, progress=False)
    assert len(output.images) == 1 and output.images[0].size == (8, 8)
    latents = pipe("a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=5, output_type="latent",
                   progress=False).images
    qmodel, scheduler = tadq.load(art)
    conditions = PromptConditions(pipe, ["a cat"])
    direct = tadq.sample(qmodel, scheduler, SAMPLER, num_samples=1, seed=5, conditions=conditions,
                         guidance_scale=GUIDANCE, progress=False)
    assert torch.equal(direct.images, latents)
    decoded = pipe.tadq_decode(direct.images, "np")
    assert np.array_equal((decoded[0] * 255).round().astype(np.uint8), np.asarray(output.images[0]))
    generator = torch.Generator().manual_seed(5)  # diffusers style: the generator's seed is the run seed
    again = pipe("a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator,
                 output_type="latent", progress=False).images
    assert torch.equal(again, latents)
    other = pipe("a dog", num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=5, output_type="latent",
                 progress=False).images
    assert not torch.equal(other, latents)


def test_quantized_and_fp_pipelines_differ_but_share_the_noise(sd_folder, sd_artefact):
    fp = tadq.load_pipeline(sd_folder)
    quantized = tadq.load_pipeline(sd_artefact)
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "seed": 1, "output_type": "latent",
              "progress": False}
    a, b = fp(["a cat", "a dog"], **kwargs).images, quantized(["a cat", "a dog"], **kwargs).images
    assert a.shape == b.shape == (2, 4, 8, 8) and not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9  # W8A8: close to FP


def test_pipeline_call_refusals(sd_artefact):
    pipe = tadq.load_pipeline(sd_artefact)
    with pytest.raises(TypeError, match=r"\['latents', 'prompt_embeds'\]"):
        pipe("a cat", latents=torch.zeros(1), prompt_embeds=torch.zeros(1))
    with pytest.raises(ValueError, match="tokens long"):
        pipe(" ".join(["cat"] * 40), num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="own size"):
        pipe("a cat", height=64, width=64)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a cat", output_type="tensor")
    # no corrections: another step count or guidance is allowed
    assert pipe("a cat", num_inference_steps=2, guidance_scale=1.0, output_type="latent", progress=False
                ).images.shape == (1, 4, 8, 8)


class _Fitted(nn.Module):
    def __init__(self, sampler_key: str, guidance: float) -> None:
        super().__init__()
        self.table_key = SimpleNamespace(sampler_key=sampler_key, guidance_scale=guidance)


def test_corrections_keyed_to_another_grid_or_guidance_are_refused():
    denoiser = nn.Module()
    denoiser.corrections = nn.ModuleList([_Fitted(SAMPLER.key, GUIDANCE)])
    recipe = SimpleNamespace(sampler=SAMPLER, guidance_scale=GUIDANCE)
    assert resolve_deployment(denoiser, recipe, None, None, None, 7.5) == (SAMPLER, GUIDANCE)
    with pytest.raises(ValueError, match="fitted for ddim"):
        resolve_deployment(denoiser, recipe, STEPS + 1, None, None, 7.5)
    with pytest.raises(ValueError, match="fitted at guidance_scale=3"):
        resolve_deployment(denoiser, recipe, None, 5.0, None, 7.5)
    denoiser.corrections = nn.ModuleList()
    sampler, scale = resolve_deployment(denoiser, None, 7, 5.0, None, 7.5)
    assert (sampler.num_steps, scale) == (7, 5.0)
    assert resolve_deployment(denoiser, None, None, None, None, 7.5)[1] == 7.5  # no recipe: the pipeline default


def test_text_encoder_int8_weights_are_per_channel_and_change_the_key(sd_folder):
    from tadq.pipelines.text_weights import quantize_linear_weights

    fp = load_fp_pipeline(sd_folder)
    int8 = load_fp_pipeline(sd_folder, text_encoder_bits=8)
    assert int8.tadq_text_encoder_bits == 8 and fp.tadq_text_encoder_bits is None
    layers = [name for name, m in int8.text_encoder.named_modules() if isinstance(m, nn.Linear)]
    assert layers
    fp_modules = dict(fp.text_encoder.named_modules())
    for name in layers:
        w, w_fp = int8.text_encoder.get_submodule(name).weight, fp_modules[name].weight
        scale = w_fp.abs().amax(dim=1, keepdim=True) / 127
        codes = w / scale
        assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the per-row grid
        assert codes.abs().max() <= 127 + 1e-3
        assert (w - w_fp).abs().le(scale / 2 + 1e-7).all() and not torch.equal(w, w_fp)
    token = next(key for key in fp.text_encoder.state_dict() if key.endswith("token_embedding.weight"))
    assert torch.equal(int8.text_encoder.state_dict()[token], fp.text_encoder.state_dict()[token])  # embeddings FP
    before = {k: v.clone() for k, v in int8.text_encoder.state_dict().items()}
    quantize_linear_weights(int8.text_encoder, 8)  # twice: nothing moves beyond float rounding
    for key, value in int8.text_encoder.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-7)
    a, b = PromptConditions(fp, ["a cat"]), PromptConditions(int8, ["a cat"])
    assert a.key != b.key
    ea, eb = a(0, [0]).encoder_hidden_states, b(0, [0]).encoder_hidden_states
    assert not torch.equal(ea, eb)
    assert torch.nn.functional.cosine_similarity(ea.flatten(), eb.flatten(), dim=0) > 0.99
    with pytest.raises(ValueError, match="text_encoder_bits"):
        load_fp_pipeline(sd_folder, text_encoder_bits=6)


def test_fitted_corrections_act_in_the_pipeline_and_key_its_calls(sd_folder, condition_adapter, tmp_path):
    from tadq.corrections.ptqd.config import PTQDConfig
    from tadq.corrections.stack import CorrectionStack

    pipe = load_fp_pipeline(sd_folder)
    recipe = dataclasses.replace(_recipe(), corrections=(PTQDConfig(num_samples=8),))
    qmodel = tadq.quantize(pipe.unet, pipe.scheduler, recipe, conditions=PromptConditions(pipe, ["a cat", "a dog"]),
                           progress=False)
    save_pipeline(qmodel, sd_folder, tmp_path / "ptqd")
    qpipe = tadq.load_pipeline(tmp_path / "ptqd")
    latents = qpipe("a cat", seed=3, output_type="latent", progress=False).images  # the recipe's steps and scale
    loaded, scheduler = tadq.load(tmp_path / "ptqd")
    conditions = PromptConditions(qpipe, ["a cat"])
    kwargs = {"num_samples": 1, "seed": 3, "conditions": conditions, "guidance_scale": GUIDANCE, "progress": False}
    assert torch.equal(tadq.sample(loaded, scheduler, SAMPLER, **kwargs).images, latents)
    loaded.corrections = CorrectionStack()
    assert not torch.equal(tadq.sample(loaded, scheduler, SAMPLER, **kwargs).images, latents)  # PTQD acted
    for call, match in (({"num_inference_steps": STEPS + 1}, "fitted for ddim"),
                        ({"guidance_scale": GUIDANCE + 2}, "fitted at guidance_scale"), ({"eta": 1.0}, "eta1")):
        with pytest.raises(ValueError, match=match):
            qpipe("a cat", progress=False, **call)


def test_a_changed_fp_component_of_the_artefact_is_caught_by_its_manifest(sd_artefact, tmp_path):
    import shutil

    from tadq.io.manifest import ArtefactDamaged

    copy = tmp_path / "art"
    shutil.copytree(sd_artefact, copy)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, valid header: only the manifest's hash can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtefactDamaged, match="vae/diffusion_pytorch_model.safetensors"):
        tadq.load_pipeline(copy)


@pytest.mark.parametrize("class_name, kind", [("DDPMScheduler", "flow-euler"), ("PNDMScheduler", "flow-euler"),
                                              ("FlowMatchEulerDiscreteScheduler", "ddim"),
                                              ("FlowMatchEulerDiscreteScheduler", "dpmsolver++")])
def test_the_folder_pairing_check_is_check_drivables_own(tmp_path, class_name, kind):
    """``check_sampler_family`` (the commands' check before loading) carried its own copy of ``check_drivable``'s
    family rule, in its own words: the two could drift apart. One rule now, one message, the folder named."""
    from tadq.pipelines.quantized import check_sampler_family
    from tadq.sampling.config import check_drivable

    (tmp_path / "scheduler").mkdir()
    config = {"_class_name": class_name, "num_train_timesteps": 1000}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    sampler = SamplerConfig(kind, num_steps=4)
    with pytest.raises(NotImplementedError) as at_sampling:
        check_drivable(class_name, config, sampler)
    with pytest.raises(NotImplementedError) as before_loading:
        check_sampler_family(tmp_path, sampler)
    assert str(before_loading.value) == str(at_sampling.value).replace(" cannot drive ", f" cannot drive {tmp_path}, ")
    check_sampler_family(tmp_path, SamplerConfig("flow-euler" if "FlowMatch" in class_name else "ddim", num_steps=4))


def test_an_artefacts_edited_tokenizer_file_is_refused_by_the_prompt_check(sd_artefact, tmp_path):
    """The prompt-length check reads an artefact's tokenizers before the pipeline (and its manifest check) is
    loaded: a vocabulary edited after the save (one token's spelling changed, still valid JSON) was read as it
    stood, and a damaged one ended in the tokenizer library's traceback. Its files are held to the manifest."""
    import shutil

    from tadq.io.manifest import ArtefactDamaged
    from tadq.pipelines.prompts import check_prompt_lengths

    copy = tmp_path / "art"
    shutil.copytree(sd_artefact, copy)
    file = copy / "tokenizer" / "tokenizer.json"
    tokenizer = json.loads(file.read_text())
    vocab = tokenizer["model"]["vocab"]
    first = sorted(vocab)[0]
    vocab[first + "x"] = vocab.pop(first)
    file.write_text(json.dumps(tokenizer))
    with pytest.raises(ArtefactDamaged, match=r"tokenizer/tokenizer\.json"):
        check_prompt_lengths(copy, ["a seven"])
