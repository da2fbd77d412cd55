"""Pipeline folders: loading, missing or damaged components named before any weights are read, prompts encoded
as diffusers encodes them, deterministically and once per distinct prompt."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file
from tests.pipelines.builders import MAX_TOKENS

from tadq.pipelines import PipelineFolderError, PromptConditions, check_pipeline_folder, load_fp_pipeline
from tadq.pipelines.prompts import check_prompt_lengths

LONG = " ".join(["cat"] * (MAX_TOKENS + 2))


@pytest.fixture(scope="module")
def sd_pipe(sd_folder):
    return load_fp_pipeline(sd_folder)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_folder):
    return load_fp_pipeline(sdxl_folder)


def test_loads_both_pipelines_without_safety_checker(sd_pipe, sdxl_pipe):
    assert isinstance(sd_pipe, StableDiffusionPipeline) and sd_pipe.safety_checker is None
    assert isinstance(sdxl_pipe, StableDiffusionXLPipeline) and sdxl_pipe.text_encoder_2 is not None
    layout = check_pipeline_folder(sd_pipe.config._name_or_path)
    assert layout.class_name == "StableDiffusionPipeline" and layout.text_conditioned
    assert set(layout.components) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}


def test_loading_without_accelerate_prints_no_install_advice(sd_folder):
    """Without accelerate diffusers loads the plain way anyway, after telling to ``pip install accelerate`` on
    every load (five lines in every text-to-image command's output); tadq asks for the plain way itself."""
    import importlib.util
    import logging

    if importlib.util.find_spec("accelerate") is not None:
        pytest.skip("accelerate is installed: diffusers loads with low_cpu_mem_usage and says nothing")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")  # its own stderr handler, not propagated to pytest's
    diffusers_logger.addHandler(handler)
    try:
        load_fp_pipeline(sd_folder)
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "accelerate" in r.getMessage()]


def _copy(folder, tmp_path):
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("component", ["vae", "text_encoder_2", "tokenizer"])
def test_missing_component_folder_is_named(sdxl_folder, tmp_path, component):
    broken = _copy(sdxl_folder, tmp_path)
    shutil.rmtree(broken / component)
    with pytest.raises(PipelineFolderError, match=f"component folder {component}/"):
        load_fp_pipeline(broken)


def test_truncated_weights_are_named_before_loading(sd_folder, tmp_path):
    broken = _copy(sd_folder, tmp_path)
    weights = broken / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(PipelineFolderError, match="text_encoder/model.safetensors is damaged"):
        load_fp_pipeline(broken)


def test_unparsable_config_and_pickle_only_weights_are_refused(sd_folder, tmp_path):
    broken = _copy(sd_folder, tmp_path)
    (broken / "vae" / "config.json").write_text("{not json")
    with pytest.raises(PipelineFolderError, match="vae/config.json .* damaged"):
        check_pipeline_folder(broken)
    shutil.copyfile(sd_folder / "vae" / "config.json", broken / "vae" / "config.json")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").rename(broken / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(PipelineFolderError, match="no safetensors weights"):
        check_pipeline_folder(broken)


def _edit_tensors(file, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _stored_key(file, suffix: str) -> str:
    """The name ``file`` stores a tensor under: transformers 5.0 writes a CLIPTextModel's as
    ``text_model.encoder...``, later releases as ``encoder...``."""
    (key,) = [key for key in load_file(file) if key == suffix or key.endswith(f".{suffix}")]
    return key


def test_text_encoder_weights_missing_a_tensor_are_refused_not_filled_at_random(sd_folder, tmp_path):
    """transformers fills a parameter its file lacks with random values and only prints a load report: every prompt
    was then encoded by a partly random text encoder (diffusers' own models were already checked)."""
    broken = _copy(sd_folder, tmp_path)
    key = _stored_key(broken / "text_encoder" / "model.safetensors", "encoder.layers.0.mlp.fc1.weight")
    _edit_tensors(broken / "text_encoder" / "model.safetensors", lambda tensors: tensors.pop(key))
    with pytest.raises(PipelineFolderError, match=rf"text_encoder: its weights lack 1 of the CLIPTextModel's "
                                                  rf"parameters \(e\.g\. {re.escape(key)}\)"):
        load_fp_pipeline(broken)


@pytest.mark.parametrize(("file", "key"), [("text_encoder/model.safetensors", "encoder.layers.0.mlp.fc1.weight"),
                                           ("vae/diffusion_pytorch_model.safetensors", "decoder.conv_in.bias")])
def test_non_finite_weights_of_a_text_encoder_or_vae_are_refused_on_load(sd_folder, tmp_path, file, key):
    """Only the denoiser's weights were checked for NaN: a NaN in the VAE decoded every sample to NaN (black
    images), one in the text encoder made every condition NaN."""
    broken = _copy(sd_folder, tmp_path)
    key = _stored_key(broken / file, key)

    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")

    _edit_tensors(broken / file, poison)
    with pytest.raises(PipelineFolderError, match=rf"{file.split('/')[0]}: weight {re.escape(key)} holds NaN"):
        load_fp_pipeline(broken)


@pytest.mark.parametrize(("component", "key", "value"), [("vae", "block_out_channels", 8),
                                                         ("text_encoder", "num_hidden_layers", "2"),
                                                         ("scheduler", "trained_betas", "x")])
def test_a_component_config_value_of_the_wrong_type_names_the_component(sd_folder, tmp_path, component, key,
                                                                         value):
    """diffusers (a TypeError inside a block, or torch.tensor) and transformers (its config validation error,
    which the CLI did not take for an input error: a traceback) named no file."""
    broken = _copy(sd_folder, tmp_path)
    config = broken / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    config.write_text(json.dumps(json.loads(config.read_text()) | {key: value}))
    with pytest.raises(PipelineFolderError, match=rf"{re.escape(str(broken / component))}: diffusers could not load "
                                                  "it .*its config holds a value diffusers does not take"):
        load_fp_pipeline(broken)


def test_a_vae_of_another_latent_width_is_refused_before_any_work(sd_folder, tmp_path):
    """A VAE with 8 latent channels beside a UNet of 4 (a VAE from another model, SD3's or Flux's 16-channel one)
    loaded, calibrated and saved: ``tadq quantize`` wrote the artefact and ``tadq sample`` sampled every step, then
    ended in a conv traceback (exit 1) in the VAE. The folder check compares the two configs first."""
    from diffusers import AutoencoderKL
    from typer.testing import CliRunner

    from tadq.cli.app import app

    broken = _copy(sd_folder, tmp_path)
    shutil.rmtree(broken / "vae")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1, latent_channels=8,
                  norm_num_groups=4, sample_size=8).save_pretrained(broken / "vae")
    with pytest.raises(PipelineFolderError, match=r"vae/config.json has latent_channels 8, but the unet samples "
                                                  r"latents of in_channels 4 \(unet/config.json\)"):
        check_pipeline_folder(broken)
    out = tmp_path / "art"
    result = CliRunner().invoke(app, [str(a) for a in ["quantize", broken, "--out", out, "--preset", "W8A8",
                                                       "--method", "naive", "--steps", 2, "--calib-trajectories", 2,
                                                       "--calib-prompt", "a dog", "--threads", 1]])
    assert result.exit_code == 2 and "latent_channels 8" in result.output and not out.exists(), result.output


@pytest.mark.parametrize("tokenizer", ["tokenizer", "tokenizer_2"])
def test_a_tokenizer_longer_than_its_encoders_positions_is_named_before_loading(sdxl_folder, tmp_path, tokenizer):
    """A CLIP tokenizer pads to ``model_max_length``: one longer than its text encoder's position table loaded the
    whole pipeline, then failed at the first prompt with "Sequence length must be less than
    max_position_embeddings (got 24 and 16)", naming neither of SDXL's two encoders."""
    broken = _copy(sdxl_folder, tmp_path)
    config = broken / tokenizer / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"model_max_length": MAX_TOKENS + 8}))
    encoder = "text_encoder" + tokenizer.removeprefix("tokenizer")
    with pytest.raises(PipelineFolderError, match=rf"{tokenizer}/tokenizer_config.json pads prompts to "
                                                  rf"model_max_length {MAX_TOKENS + 8} tokens, but {encoder} holds "
                                                  rf"{MAX_TOKENS} positions"):
        check_pipeline_folder(broken)
    config.write_text(json.dumps(json.loads(config.read_text()) | {"model_max_length": MAX_TOKENS - 4}))
    check_pipeline_folder(broken)  # shorter than the table: diffusers pads to it and runs


def test_a_component_the_class_needs_but_the_index_lacks(sd_folder, tmp_path):
    broken = _copy(sd_folder, tmp_path)
    index = (broken / "model_index.json").read_text().replace('"text_encoder"', '"text_encoder_x"')
    (broken / "model_index.json").write_text(index)
    with pytest.raises(PipelineFolderError, match="lists no 'text_encoder'"):
        check_pipeline_folder(broken)


@pytest.mark.parametrize(("component", "library", "class_name"), [("vae", "diffusers", "AutoencoderKL"),
                                                                   ("text_encoder", "transformers", "CLIPTextModel")])
def test_a_component_class_its_library_lacks_names_model_index(sd_folder, tmp_path, component, library, class_name):
    """diffusers failed inside that component's loading, and the message blamed the component's own config."""
    broken = _copy(sd_folder, tmp_path)
    index = json.loads((broken / "model_index.json").read_text())
    assert index[component] == [library, class_name]
    index[component] = [library, f"{class_name}Renamed"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineFolderError, match=rf"model_index.json: its component '{component}' is a {library} "
                                                  rf"{class_name}Renamed, a class {library} \S+ does not have"):
        load_fp_pipeline(broken)


def test_a_denoiser_folder_is_not_a_prompt_pipeline(tiny_model_dir):
    with pytest.raises(PipelineFolderError, match="DDPMPipeline"):
        check_pipeline_folder(tiny_model_dir)


def test_too_long_prompt_is_refused_before_encoding(sd_pipe, sd_folder):
    with pytest.raises(ValueError, match=f"tokens long .* at most {MAX_TOKENS}"):
        PromptConditions(sd_pipe, ["a cat", LONG])
    with pytest.raises(ValueError, match="negative prompt .* tokens long"):
        PromptConditions(sd_pipe, ["a cat"], negative_prompt=LONG)
    with pytest.raises(ValueError, match="calibration prompt .* tokens long"):
        check_prompt_lengths(sd_folder, ["a dog", LONG], "calibration prompt")
    check_prompt_lengths(sd_folder, ["a dog"])  # a prompt within the limit passes


def test_a_prompt_holding_undecoded_bytes_is_refused_by_name(sd_folder):
    """A prompt typed under a non-UTF-8 locale (``LC_ALL=C``) reaches Python with its bytes as lone surrogates; the
    tokenizers refused it with "TextEncodeInput must be Union[...]", which named neither the prompt nor the cause."""
    with pytest.raises(ValueError, match=r"'caf\\udcc3\\udca9 au lait' holds bytes that are not text.*UTF-8"):
        check_prompt_lengths(sd_folder, ["a dog", "caf\udcc3\udca9 au lait"])


def test_sd_prompts_equal_diffusers_encode_prompt(sd_pipe):
    conditions = PromptConditions(sd_pipe, ["a cat", "a dog"], negative_prompt="blurry")
    cond = conditions(0, [0, 1])
    with torch.no_grad():
        embeds, negative = sd_pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, True, ["blurry", "blurry"])
    torch.testing.assert_close(cond.encoder_hidden_states, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.unconditional.encoder_hidden_states, negative, rtol=0, atol=1e-6)
    assert cond.pooled_embeds is None and not cond.added_cond_kwargs


def test_sdxl_prompts_equal_diffusers_encode_prompt(sdxl_pipe):
    conditions = PromptConditions(sdxl_pipe, ["a cat"])
    cond = conditions(0, [0, 1])
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(
            ["a cat"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    assert cond.encoder_hidden_states.shape == (2, MAX_TOKENS, 32) and cond.pooled_embeds.shape == (2, 8)
    torch.testing.assert_close(cond.encoder_hidden_states[:1], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled_embeds[:1], pooled, rtol=0, atol=1e-6)
    # no negative prompt + force_zeros_for_empty_prompt: zeros, as diffusers
    assert torch.count_nonzero(cond.unconditional.encoder_hidden_states) == 0 == torch.count_nonzero(negative)
    assert torch.count_nonzero(negative_pooled) == 0
    size = sdxl_pipe.unet.config.sample_size * sdxl_pipe.vae_scale_factor
    expected = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
    assert torch.equal(cond.added_cond_kwargs["time_ids"], expected)
    assert torch.equal(cond.unconditional.added_cond_kwargs["time_ids"], expected)
    with_negative = PromptConditions(sdxl_pipe, ["a cat"], negative_prompt="")(0, [0])
    assert torch.count_nonzero(with_negative.unconditional.encoder_hidden_states) > 0  # "" encoded when given


def test_prompt_conditions_are_cyclic_deterministic_and_cached(sd_pipe):
    conditions = PromptConditions(sd_pipe, ["a cat", "a dog", "a cat"])
    assert [conditions.prompt_of(i) for i in range(5)] == ["a cat", "a dog", "a cat", "a cat", "a dog"]
    together = conditions(0, range(6))
    assert conditions.encoder_calls == 3  # "a cat", "a dog" and the empty negative prompt, once each
    # one sample at a time, each with another seed: the seed plays no role, the index does
    apart = [conditions(seed, [i]) for seed, i in zip((7, 8, 9, 10, 11, 12), range(6), strict=True)]
    assert conditions.encoder_calls == 3
    for i, row in enumerate(apart):
        assert torch.equal(row.encoder_hidden_states, together.encoder_hidden_states[i: i + 1])
    assert torch.equal(together.encoder_hidden_states[0], together.encoder_hidden_states[2])
    assert not torch.equal(together.encoder_hidden_states[0], together.encoder_hidden_states[1])
    fresh = PromptConditions(sd_pipe, ["a cat", "a dog", "a cat"])
    assert torch.equal(fresh(0, [4]).encoder_hidden_states, together.encoder_hidden_states[4:5])
    assert fresh.key == conditions.key
    assert PromptConditions(sd_pipe, ["a cat", "a dog"]).key != conditions.key
    assert PromptConditions(sd_pipe, ["a cat", "a dog", "a cat"], negative_prompt="dog").key != conditions.key
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        PromptConditions(sd_pipe, ["a cat", "a dog", "a cat"], negative_prompt=["x", "y"])


def test_load_pipeline_parts_still_gives_the_unet_and_scheduler(sd_folder, sdxl_folder, condition_adapter):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from tadq.models import load_pipeline_parts

    for folder in (sd_folder, sdxl_folder):
        unet, scheduler = load_pipeline_parts(folder)
        assert isinstance(unet, UNet2DConditionModel) and isinstance(scheduler, DDIMScheduler)
        assert not unet.training


def test_an_unreadable_tokenizer_file_is_named_not_a_traceback(sd_folder, tmp_path):
    """A damaged ``tokenizer/tokenizer.json`` (whose parser raises a bare ``Exception``) ended `tadq sample` and
    `tadq quantize` in a traceback from the prompt-length check, and ``load_fp_pipeline`` blamed an edited config."""
    broken = _copy(sd_folder, tmp_path)
    file = broken / "tokenizer" / "tokenizer.json"
    tokenizer = json.loads(file.read_text())
    tokenizer["truncation"] = {"max_length": 8}  # valid JSON the tokenizers library cannot build from (no strategy)
    file.write_text(json.dumps(tokenizer))
    folder = re.escape(str(broken / "tokenizer"))
    with pytest.raises(PipelineFolderError, match=rf"{folder}: transformers could not read the tokenizer"):
        check_prompt_lengths(broken, ["a seven"])
    with pytest.raises(PipelineFolderError, match=rf"{folder}: diffusers could not load it .*damaged or edited"):
        load_fp_pipeline(broken)
