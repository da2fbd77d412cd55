"""The text-to-image paths as a user drives them: ``tadq quantize FOLDER --calib-prompt(s)``,
``tadq sample ART --prompt ...`` and ``tadq.load_pipeline(...)(prompt, **diffusers_kwargs)``.

Defects found and fixed here: a 64-bit-seeded ``torch.Generator()`` refused with a message about a ``seed`` the
caller never gave (now it names the generator), class-conditional flags silently ignored on a pipeline, ``height=0``
accepted, a failed ``tadq sample`` that left a folder whose PNGs and ``prompts.json`` disagree, inputs checked only
after the pipeline was loaded, and a UTF-8 BOM that became part of the first calibration prompt.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tests.backends.machine import needs_int8_w8
from tests.pipelines.builders import build_sd, build_sdxl, with_scheduler
from typer.testing import CliRunner

import tadq
from tadq.cli.app import app

runner = CliRunner()
STEPS, GUIDANCE = 2, 2.5
PROMPTS = ["a cat", "a dog"]


def _invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


def _quantize(folder, out, cache, *extra):
    result, text = _invoke(["quantize", folder, "--out", out, "--preset", "W8A8", "--method", "naive",
                            "--steps", STEPS, "--calib-trajectories", 2, "--guidance-scale", GUIDANCE,
                            "--cache-dir", cache, "--threads", 1, *extra])
    assert result.exit_code == 0, text
    return out


@pytest.fixture(scope="module")
def folders(condition_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("redteam-folders")
    return {"sd": build_sd(root / "sd"), "sdxl": build_sdxl(root / "sdxl")}


@pytest.fixture(scope="module")
def art(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("redteam-art")
    prompts = root / "calib.txt"
    # blank lines, CRLF line ends, surrounding spaces, a non-ASCII prompt within the tiny tokenizer's 16 tokens
    prompts.write_bytes("a dog\r\n\r\n   \r\n  a red car  \r\nun café\r\n".encode())
    return _quantize(folders["sd"], root / "art", root / "cache", "--calib-prompts", prompts)


@pytest.fixture(scope="module")
def pipe(art):
    return tadq.load_pipeline(art)


@pytest.fixture(scope="module")
def fp_pipe(folders):
    return tadq.load_pipeline(folders["sd"])


CALL = {"progress": False}


# ------------------------------------------------------------------------------------------ defects found and fixed


def test_a_generator_with_a_64_bit_seed_is_refused_naming_the_generator(pipe):
    """``pipe(prompt, generator=torch.Generator())``: an unseeded generator's initial seed is 67280421310721 (> 2**32)
    and tadq keys every sample's noise by a 32-bit seed and its index (a larger seed would replay another seed's
    noise). It was refused with "tadq.sample: seed must be ...", naming a seed the caller never gave; now the refusal
    names the generator and the fix, and a generator seeded below 2**32 samples like seed=."""
    for make in (torch.Generator, lambda: torch.Generator().manual_seed(2 ** 40)):
        with pytest.raises(ValueError, match=r"^generator: its initial seed \d+ is above 2\*\*32 - 1.*manual_seed"):
            pipe("a cat", generator=make(), output_type="latent", **CALL)
    seeded = pipe("a cat", generator=torch.Generator().manual_seed(2 ** 32 - 1), output_type="latent", **CALL).images
    assert torch.equal(seeded, pipe("a cat", seed=2 ** 32 - 1, output_type="latent", **CALL).images)


@pytest.mark.parametrize("flag", [["--class-label", 3], ["--labels", "random"], ["--null-class", 0]])
def test_sample_refuses_class_conditional_flags_on_a_pipeline(art, tmp_path, flag):
    """``tadq sample ART --prompt ... --class-label 3`` (or --labels / --null-class) exited 0 and ignored the flag;
    ``tadq quantize`` refuses --labels/--null-class on a pipeline. It should be refused by name, writing nothing."""
    out = tmp_path / "s"
    result, text = _invoke(["sample", art, "--prompt", "a cat", "--num-samples", 1, *flag, "--out", out,
                            "--threads", 1])
    assert result.exit_code == 2, f"{flag[0]} was accepted on a text-to-image pipeline: {text[-200:]}"
    assert flag[0] in text and not out.exists()


def test_height_and_width_zero_are_refused(pipe):
    """``height=0, width=0`` went through ``height or native`` and sampled at the native size; diffusers would fail
    on it. It is no size at all: refuse it as any other size than the denoiser's own."""
    with pytest.raises(ValueError, match="height"):
        pipe("a cat", height=0, width=0, output_type="latent", **CALL)


def _fail_the_second_png_save(monkeypatch) -> None:
    """A full disk while the second image is written."""
    original, calls = Image.Image.save, []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)


def test_a_failed_sample_run_does_not_leave_pngs_that_prompts_json_does_not_describe(art, tmp_path, monkeypatch):
    """A first run writes cat/dog samples to OUT. A second run into OUT with other prompts fails while writing its
    second PNG (disk full): sample_0000.png was already replaced by the new prompt's image, while prompts.json (and
    grid.png) still describe the first run, so the folder claims the wrong prompt for that image. A failed run
    should leave the earlier results intact (or nothing that contradicts them)."""
    out = tmp_path / "out"
    result, text = _invoke(["sample", art, "--prompt", "a cat", "--prompt", "a dog", "--num-samples", 2, "--seed", 1,
                            "--out", out, "--threads", 1])
    assert result.exit_code == 0, text
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    _fail_the_second_png_save(monkeypatch)
    result, text = _invoke(["sample", art, "--prompt", "a red car", "--prompt", "un café", "--num-samples", 2,
                            "--seed", 2, "--out", out, "--threads", 1])
    monkeypatch.undo()
    assert result.exit_code != 0
    record = json.loads((out / "prompts.json").read_text())
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    if record["samples"]["sample_0000.png"] == "a cat":  # prompts.json still the first run's
        assert after["sample_0000.png"] == before["sample_0000.png"], (
            "sample_0000.png now holds the failed run's 'a red car' image, prompts.json still says 'a cat'")


def test_a_fresh_out_folder_is_not_left_half_written(art, tmp_path, monkeypatch):
    """The same failure into a new --out left a marked folder with sample_0000.png and no prompts.json/grid.png."""
    out = tmp_path / "fresh"
    _fail_the_second_png_save(monkeypatch)
    result, _ = _invoke(["sample", art, "--prompt", "a cat", "--num-samples", 2, "--out", out, "--threads", 1])
    monkeypatch.undo()
    assert result.exit_code != 0
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not any(name.startswith("sample_") for name in left) or "prompts.json" in left, left


@pytest.mark.parametrize("flag", [
    ["--seed", -1], ["--steps", 0], ["--guidance-scale", 0.5], ["--eta", 2],
    ["--guidance-scale", -1], ["--guidance-scale", "nan"], ["--sampler", "foo"], ["--sampler", "euler", "--eta", 0.5],
    ["--sampler", "flow-euler"]])
def test_sample_checks_its_inputs_before_loading_the_pipeline(art, tmp_path, monkeypatch, flag):
    """``sample_pipeline``'s docstring: "Every input and path is checked before the pipeline is loaded". A seed
    outside [0, 2**32), --steps 0, a guidance in [0, 1) and an η outside [0, 1] are only refused after every
    component (text encoder, VAE, UNet) has been read; on a real SD/SDXL folder that is many seconds to minutes.
    So were a negative or NaN guidance scale, an unknown sampler kind, η with Euler and flow-euler on an ε
    model (the sampler and the scale were resolved only by the loaded pipeline)."""
    import tadq.pipelines

    def must_not_load(*args, **kwargs):
        raise AssertionError("LOADED-BEFORE-CHECKING")

    monkeypatch.setattr(tadq.pipelines, "load_pipeline", must_not_load)
    result, text = _invoke(["sample", art, "--prompt", "a cat", "--num-samples", 1, *flag, "--out", tmp_path / "s",
                            "--threads", 1])
    assert result.exit_code == 2
    assert "LOADED-BEFORE-CHECKING" not in text and not isinstance(result.exception, AssertionError), (
        f"{flag} was checked only after loading the pipeline")
    assert not (tmp_path / "s").exists()


def test_sample_runs_an_fp_folders_own_sampler_and_checks_eta_against_it_before_loading(folders, tmp_path,
                                                                                         monkeypatch):
    """``tadq sample`` on an FP SD folder shipping an Euler-ancestral scheduler sampled DDIM (η allowed, x̂₀
    clipped by DDIM's default) where diffusers runs Euler ancestral and docs/pipelines.md says "the sampler its
    scheduler names". It now runs euler-ancestral, records it, and refuses --eta for it before loading."""
    from diffusers import EulerAncestralDiscreteScheduler

    import tadq.pipelines

    folder = with_scheduler(folders["sd"], tmp_path / "sd", EulerAncestralDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1))
    result, text = _invoke(["sample", folder, "--prompt", "a cat", "--num-samples", 1, "--steps", STEPS,
                            "--out", tmp_path / "s", "--threads", 1])
    assert result.exit_code == 0, text
    assert json.loads((tmp_path / "s" / "prompts.json").read_text())["sampler"]["data"]["kind"] == "euler-ancestral"

    def must_not_load(*args, **kwargs):
        raise AssertionError("LOADED-BEFORE-CHECKING")

    monkeypatch.setattr(tadq.pipelines, "load_pipeline", must_not_load)
    result, text = _invoke(["sample", folder, "--prompt", "a cat", "--num-samples", 1, "--eta", 0.5,
                            "--out", tmp_path / "s2", "--threads", 1])
    assert result.exit_code == 2 and "euler-ancestral fixes its own noise" in text, text
    assert not (tmp_path / "s2").exists()


def test_quantize_refuses_a_sampler_of_the_other_family_before_loading(folders, tmp_path, monkeypatch):
    """``tadq quantize SD --sampler flow-euler`` read every component of the pipeline before the sampler refused
    the discrete schedule."""
    import tadq.pipelines

    def must_not_load(*args, **kwargs):
        raise AssertionError("LOADED-BEFORE-CHECKING")

    monkeypatch.setattr(tadq.pipelines, "load_fp_pipeline", must_not_load)
    result, text = _invoke(["quantize", folders["sd"], "--calib-prompt", "a cat", "--sampler", "flow-euler",
                            "--out", tmp_path / "q", "--cache-dir", tmp_path / "cache", "--threads", 1])
    assert result.exit_code == 2 and "sampler 'flow-euler' cannot drive" in text, text
    assert not (tmp_path / "q").exists()


def test_a_prompt_file_line_ends_only_at_a_line_break(tmp_path):
    """``read_prompt_file`` (--prompts, --calib-prompts, --eval-prompts) split lines with ``str.splitlines``, which
    also breaks at U+2028, form feeds, NEL and the ASCII separators \\x1c-\\x1e: a prompt pasted with one became
    two, and every later sample was paired with another prompt than the file's line. CRLF, CR, a BOM, blank and
    whitespace-only lines are read as before."""
    from tadq.cli.common import read_prompt_file

    inside = ["a cat\u2028sitting", "a dog\x0cbarking", "a red\x85car", "a\x1cb\x1dc\x1ed", "x\x0by"]
    file = tmp_path / "prompts.txt"
    file.write_bytes(("\ufeff" + "\r\n".join(inside) + "\r\n\r\n  \rlast\n\n").encode())
    assert read_prompt_file(file, "--prompts") == (*inside, "last")


def test_sample_says_a_negative_prompt_is_not_used_without_guidance(art, tmp_path):
    """``--negative-prompt`` at guidance 1 (given, or a Flux folder's default) was dropped without a word, where the
    pipeline call warns; at a scale above 1 nothing is said."""
    for scale, warned in (("1", True), (str(GUIDANCE), False)):
        result, text = _invoke(["sample", art, "--prompt", "a cat", "--negative-prompt", "a dog", "--num-samples", 1,
                                "--guidance-scale", scale, "--out", tmp_path / scale, "--threads", 1])
        assert result.exit_code == 0, text
        assert ("--negative-prompt is not used" in text) is warned, text


def test_a_prompt_file_with_a_byte_order_mark_reads_as_the_file_without_it(tmp_path):
    """The reading half of the test below, in the default suite: Notepad's UTF-8 BOM is no part of the first
    prompt, and a BOM further in is kept (it is text there, not a mark)."""
    from tadq.cli.common import read_prompt_file

    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text("a dog\nb \ufeffcat\n", encoding="utf-8")
    bom.write_text("a dog\nb \ufeffcat\n", encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_prompt_file(bom, "--calib-prompts") == read_prompt_file(plain, "--calib-prompts") == (
        "a dog", "b \ufeffcat")


@pytest.mark.slow  # three SD quantizations, ≈ 7 s on a 2-core AVX2 CPU; the reading is checked above
def test_a_byte_order_mark_is_not_part_of_the_first_calibration_prompt(folders, tmp_path):
    """A prompt file saved by Windows Notepad starts with a UTF-8 BOM. ``--calib-prompts`` reads it with
    ``read_text()``, so the first prompt becomes '\\ufeffa dog' (three extra tokens for CLIP) and the artefact is
    calibrated on another prompt than the file says, silently. It should equal the artefact from the same file
    without the BOM."""
    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text("a dog\n", encoding="utf-8")
    bom.write_text("a dog\n", encoding="utf-8-sig")
    a = _quantize(folders["sd"], tmp_path / "a", tmp_path / "cache", "--calib-prompts", plain)
    control = _quantize(folders["sd"], tmp_path / "c", tmp_path / "cache2", "--calib-prompt", "a dog")
    b = _quantize(folders["sd"], tmp_path / "b", tmp_path / "cache", "--calib-prompts", bom)
    wa, wb = load_file(str(a / "tadq_weights.safetensors")), load_file(str(b / "tadq_weights.safetensors"))
    wc = load_file(str(control / "tadq_weights.safetensors"))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)  # the same prompt from a file or a flag: the same artefact
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"the BOM changed the calibration: {differ[:3]}"


def test_an_empty_calibration_prompt_file_beside_a_flag_is_refused_before_loading(folders, tmp_path):
    """``--calib-prompt "a dog" --calib-prompts empty.txt``: the file read like every other prompt file, so a
    file without a prompt (a wrong path to a freshly created file, a file not yet written) is refused, as it is
    alone, not silently dropped because the flag gave a prompt."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    result, text = _invoke(["quantize", folders["sd"], "--out", tmp_path / "art", "--preset", "W8A8", "--method",
                            "naive", "--steps", STEPS, "--calib-trajectories", 2, "--cache-dir", tmp_path / "cache",
                            "--calib-prompt", "a dog", "--calib-prompts", empty])
    assert result.exit_code != 0
    assert f"--calib-prompts {empty} holds no prompt" in text
    assert not (tmp_path / "art").exists() and not (tmp_path / "cache").exists()


def test_a_broken_link_in_a_copied_component_is_refused_before_any_work(folders, tmp_path):
    """A hub snapshot whose unused ``vae/diffusion_pytorch_model.bin`` blob was deleted: diffusers never reads the
    link, so sampling works, but the artefact copies component folders whole and ``shutil.copytree`` failed with a
    traceback after calibration and quantization. Refused first, naming the link; the denoiser's own folder (not
    copied) may hold one."""
    import shutil

    source = shutil.copytree(folders["sd"], tmp_path / "sd")
    (source / "unet" / "diffusion_pytorch_model.bin").symlink_to(tmp_path / "gone-unet")  # never copied
    (source / "vae" / "diffusion_pytorch_model.bin").symlink_to(tmp_path / "gone")
    result, text = _invoke(["quantize", source, "--out", tmp_path / "art", "--preset", "W8A8", "--method", "naive",
                            "--steps", STEPS, "--calib-trajectories", 2, "--cache-dir", tmp_path / "cache",
                            "--calib-prompt", "a dog"])
    assert result.exit_code == 2, text
    assert "vae/diffusion_pytorch_model.bin is not a file" in text and "unet/" not in text
    assert not (tmp_path / "art").exists() and not (tmp_path / "cache").exists()


def test_a_token_past_the_text_encoders_vocabulary_is_refused_before_loading(folders, tmp_path):
    """A token added to the tokenizer only (textual inversion before its embedding is trained) failed inside the
    text encoder's embedding ('index out of range in self') after the pipeline was loaded. Refused from the
    tokenizer and the encoder's config, as the prompt lengths are; a too-long negative prompt is named as such."""
    import shutil

    from transformers import AutoTokenizer

    source = shutil.copytree(folders["sd"], tmp_path / "sd")
    tokenizer = AutoTokenizer.from_pretrained(source / "tokenizer")
    tokenizer.add_tokens(["<cat-toy>"])
    tokenizer.save_pretrained(source / "tokenizer")
    vocab = json.loads((source / "text_encoder" / "config.json").read_text())["vocab_size"]
    quantized = ["quantize", source, "--out", tmp_path / "art", "--preset", "W8A8", "--method", "naive", "--steps",
                 STEPS, "--calib-trajectories", 2, "--cache-dir", tmp_path / "cache", "--calib-prompt", "a <cat-toy>"]
    sampled = ["sample", source, "--prompt", "a <cat-toy>", "--steps", STEPS, "--out", tmp_path / "s"]
    for args in (quantized, sampled):
        result, text = _invoke(args)
        assert result.exit_code == 2, text
        assert f"'<cat-toy>' id {vocab}, past the {vocab}-token vocabulary of text_encoder" in text
    assert not (tmp_path / "art").exists() and not (tmp_path / "s").exists()
    from tadq.pipelines import load_fp_pipeline
    from tadq.pipelines.prompts import prompt_encoder_for

    encoder = prompt_encoder_for(load_fp_pipeline(source))  # the Python path: named by the encoder itself
    with pytest.raises(ValueError, match=f"'<cat-toy>' id {vocab}, past the {vocab}-token vocabulary"):
        encoder.encode("a <cat-toy>")
    result, text = _invoke(["sample", source, "--prompt", "a cat", "--negative-prompt", "a dog " * 60, "--steps",
                            STEPS, "--out", tmp_path / "s"])
    assert result.exit_code == 2 and "negative prompt 'a dog" in text, text


@pytest.mark.parametrize("name", ["grid.png", "prompts.json", "sample_0000.png"])
def test_a_users_file_under_a_name_a_rerun_writes_is_refused_before_loading(folders, tmp_path, name):
    """The samples folder's mark let a rerun replace a user's own grid.png or prompts.json put beside the samples
    (stale sample PNGs were already removed only when tadq wrote them)."""
    out = tmp_path / "s"
    args = ["sample", folders["sd"], "--prompt", "a cat", "--steps", STEPS, "--out", out]
    assert _invoke(args)[0].exit_code == 0
    if name.endswith(".png"):
        Image.new("RGB", (5, 5), (255, 0, 0)).save(out / name)
    else:
        (out / name).write_text('{"my": "notes"}')
    mine = (out / name).read_bytes()
    result, text = _invoke(args)
    assert result.exit_code == 2 and f"holds {name}, which tadq did not write" in text, text
    assert (out / name).read_bytes() == mine
    assert _invoke([*args, "--force-foreign"])[0].exit_code == 0  # named explicitly: replaced
    assert (out / name).read_bytes() != mine


def test_images_the_vae_decodes_to_nan_are_refused_not_written(folders, tmp_path, monkeypatch):
    """Finite latents whose decoding overflowed (a huge guidance scale) were written as PNGs of noise with exit 0:
    the float to uint8 cast turns NaN into arbitrary bytes."""
    from tadq.pipelines import TadqPipelineMixin

    monkeypatch.setattr(TadqPipelineMixin, "_tadq_vae_decode",
                        lambda self, latents, batch_size: torch.full((latents.shape[0], 3, 16, 16), float("nan")))
    result, text = _invoke(["sample", folders["sd"], "--prompt", "a cat", "--steps", STEPS, "--out", tmp_path / "s"])
    assert result.exit_code == 2 and "decoded from finite latents holds NaN" in text, text
    assert not list(tmp_path.glob("s/*.png"))


def test_inputs_named_for_what_they_are(folders, art, tmp_path):
    """A prompt file that is not UTF-8 ("'utf-8' codec can't decode byte 0xff", naming neither file nor flag), a
    scheduler config diffusers cannot build (blamed on "weights" its config does not describe), and an artefact
    given to quantize ("unet holds no safetensors weights")."""
    import shutil

    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"\xff\xfe bad\n")
    result, text = _invoke(["sample", art, "--prompts", bad, "--out", tmp_path / "s"])
    assert result.exit_code == 2 and f"--prompts {bad} is not UTF-8 text" in text, text
    source = shutil.copytree(folders["sd"], tmp_path / "sd")
    config = source / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beta_schedule": "foo"}))
    result, text = _invoke(["sample", source, "--prompt", "a cat", "--steps", STEPS, "--out", tmp_path / "s"])
    error = text.partition("error:")[2]  # the progress bars before it say "Loading weights"
    assert result.exit_code == 2 and "scheduler" in error and "weights" not in error, text
    result, text = _invoke(["quantize", art, "--calib-prompt", "a cat", "--out", tmp_path / "q"])
    assert result.exit_code == 2 and "is a tadq artefact (already quantized" in text, text


# ------------------------------------------------------------------------------------------ what works (pass)


def test_output_types_counts_and_return_dict(pipe):
    out = pipe(PROMPTS, num_images_per_prompt=2, output_type="np", seed=0, **CALL)
    assert isinstance(out.images, np.ndarray) and out.images.shape == (4, 8, 8, 3)
    assert out.images.min() >= 0 and out.images.max() <= 1
    pt = pipe(PROMPTS, output_type="pt", seed=0, **CALL).images
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 8, 8)
    pil = pipe("a cat", seed=0, **CALL).images
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (8, 8)
    latent = pipe(("a cat",), output_type="latent", seed=0, **CALL).images
    assert latent.shape == (1, 4, 8, 8)
    images, nsfw = pipe("a cat", return_dict=False, output_type="pt", seed=0, **CALL)
    assert nsfw is None and torch.equal(images, pipe("a cat", output_type="pt", seed=0, **CALL).images)


def test_seed_and_generator_reproduce_and_differ(pipe):
    a = pipe("a cat", seed=5, output_type="latent", **CALL).images
    b = pipe("a cat", generator=torch.Generator().manual_seed(5), output_type="latent", **CALL).images
    c = pipe("a cat", seed=6, output_type="latent", **CALL).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="not both"):
        pipe("a cat", seed=1, generator=torch.Generator().manual_seed(1), **CALL)
    with pytest.raises(TypeError, match="generator"):
        pipe("a cat", generator=[torch.Generator().manual_seed(1)], **CALL)


@pytest.mark.parametrize("name, value", [
    ("latents", torch.zeros(1, 4, 8, 8)), ("prompt_embeds", torch.zeros(1, 16, 32)),
    ("negative_prompt_embeds", torch.zeros(1, 16, 32)), ("callback_on_step_end", lambda *a: {}),
    ("callback_on_step_end_tensor_inputs", ["latents"]), ("callback", lambda *a: None), ("callback_steps", 1),
    ("ip_adapter_image", np.zeros((8, 8, 3))), ("ip_adapter_image_embeds", [torch.zeros(1)]),
    ("cross_attention_kwargs", {"scale": 0.5}), ("guidance_rescale", 0.7), ("guidance_rescale", 0.0),
    ("clip_skip", 1), ("timesteps", [999, 500]), ("sigmas", [1.0, 0.5]), ("prompt_2", "x")])
def test_unsupported_diffusers_arguments_are_refused_by_name(pipe, name, value):
    with pytest.raises(TypeError, match=name):
        pipe("a cat", output_type="latent", **{name: value}, **CALL)


def test_bad_values_are_refused(pipe):
    for kwargs, error in [({"num_images_per_prompt": 0}, ValueError), ({"num_inference_steps": 0}, ValueError),
                          ({"guidance_scale": float("nan")}, ValueError), ({"guidance_scale": 0.5}, ValueError),
                          ({"output_type": "tensor"}, ValueError), ({"height": 16, "width": 16}, ValueError),
                          ({"negative_prompt": ["x"]}, ValueError), ({"max_sequence_length": 10}, TypeError)]:
        with pytest.raises(error):
            pipe(PROMPTS, **kwargs, **CALL)
    with pytest.raises(TypeError, match="str"):
        pipe(["a cat", 3], **CALL)


def test_cli_samples_pair_with_the_prompts_json_and_the_python_call(folders, fp_pipe, tmp_path):
    """CLI sample i gets prompt i mod count and noise (seed, i); prompts.json says which prompt. The same latent
    comes out of the Python call for that prompt at image index i (prompt-major repetition keeps index i's noise),
    and the Python call's num_images_per_prompt pairs images prompt-major."""
    out, tensors = tmp_path / "s", tmp_path / "t.safetensors"
    result, text = _invoke(["sample", folders["sd"], *sum((["--prompt", p] for p in PROMPTS), []),
                            "--negative-prompt", "blurry", "--num-samples", 4, "--batch-size", 3, "--seed", 7,
                            "--steps", STEPS, "--guidance-scale", GUIDANCE, "--out", out, "--tensor-out", tensors,
                            "--threads", 1])
    assert result.exit_code == 0, text
    record = json.loads((out / "prompts.json").read_text())
    assert record["samples"] == {f"sample_{i:04d}.png": PROMPTS[i % 2] for i in range(4)}
    assert record["negative_prompt"] == "blurry" and record["seed"] == 7
    assert sorted(p.name for p in out.glob("sample_*.png")) == [f"sample_{i:04d}.png" for i in range(4)]
    cli = load_file(str(tensors))["latents"]
    call = {"seed": 7, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "negative_prompt": "blurry",
            "output_type": "latent", **CALL}
    for i in range(4):
        mine = fp_pipe(record["samples"][f"sample_{i:04d}.png"], num_images_per_prompt=i + 1, **call).images[i]
        torch.testing.assert_close(mine, cli[i], rtol=0, atol=1e-5)
    both = fp_pipe(PROMPTS, num_images_per_prompt=2, **call).images  # cat, cat, dog, dog
    cats = fp_pipe("a cat", num_images_per_prompt=2, **call).images
    dogs = fp_pipe("a dog", num_images_per_prompt=3, **call).images
    torch.testing.assert_close(both[1], cats[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[2], dogs[2], rtol=0, atol=1e-5)


def test_rerun_with_fewer_samples_removes_the_stale_ones_and_refusals_write_nothing(art, tmp_path):
    out = tmp_path / "s"
    for n in (3, 1):
        result, text = _invoke(["sample", art, "--prompt", "a cat", "--num-samples", n, "--out", out, "--threads", 1])
        assert result.exit_code == 0, text
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_0000.png"]
    for bad in (["--out", tmp_path / "x.png"], ["--num-samples", 0, "--out", tmp_path / "a"],
                ["--prompt", "b", "--num-samples", 1, "--out", tmp_path / "b"],
                ["--tensor-out", tmp_path / "t.pt", "--out", tmp_path / "c"],
                ["--backend", "int8-cuda", "--out", tmp_path / "d"],
                ["--backend", "int8-compiled", "--dtype", "bfloat16", "--out", tmp_path / "e"],
                ["--negative-prompt", " ".join(["cat"] * 40), "--out", tmp_path / "f"]):
        result, text = _invoke(["sample", art, "--prompt", "a cat", *bad, "--threads", 1])
        assert result.exit_code == 2, (bad, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_quantize_prompt_file_and_artefact_sample(art):
    recipe = json.loads((art / "tadq_recipe.json").read_text())
    assert str(GUIDANCE) in json.dumps(recipe)
    images = tadq.load_pipeline(art)("un café", seed=0, output_type="np", **CALL).images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()


@needs_int8_w8
def test_int8_backends_on_sd_and_sdxl_artefacts_agree_with_fake(folders, art, tmp_path):
    from tadq.metrics.image import psnr_per_sample

    sdxl_art = _quantize(folders["sdxl"], tmp_path / "sdxl-art", tmp_path / "cache", "--calib-prompt", "a dog")
    for artefact in (art, sdxl_art):
        runs = {}
        for backend in ("fake", "int8"):
            tensors = tmp_path / f"{artefact.name}-{backend}.safetensors"
            result, text = _invoke(["sample", artefact, "--backend", backend, *sum((["--prompt", p] for p in PROMPTS),
                                                                                    []),
                                    "--num-samples", 4, "--seed", 3, "--out", tmp_path / f"{artefact.name}-{backend}",
                                    "--tensor-out", tensors, "--threads", 1])
            assert result.exit_code == 0, text
            runs[backend] = load_file(str(tensors))["latents"]
        assert not torch.equal(runs["int8"], runs["fake"])
        assert psnr_per_sample(runs["int8"], runs["fake"]).median() >= 40.0
    # a weight-only artefact has no integer activations: refused by name, before any output
    w8a16 = _quantize(folders["sd"], tmp_path / "w8a16", tmp_path / "cache", "--calib-prompt", "a dog",
                      "--preset", "W8A16")
    for backend in ("int8", "int8-compiled"):
        result, text = _invoke(["sample", w8a16, "--backend", backend, "--prompt", "a cat", "--num-samples", 1,
                                "--out", tmp_path / f"w-{backend}", "--threads", 1])
        assert result.exit_code == 2 and "weight-only" in text, text
        assert not (tmp_path / f"w-{backend}").exists()


def test_sample_reads_prompts_from_a_file_after_the_flags(art, tmp_path):
    """``tadq sample --prompts FILE`` (as run/recipe take --calib-prompts/--eval-prompts): one prompt per line,
    blank lines skipped, after any --prompt, in order; the images equal the same prompts given as flags."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa dog\r\n\r\n  un café  \n".encode())
    runs = {"file": ["--prompt", "a cat", "--prompts", prompts],
            "flags": ["--prompt", "a cat", "--prompt", "a dog", "--prompt", "un café"]}
    for name, flags in runs.items():
        result, text = _invoke(["sample", art, *flags, "--num-samples", 3, "--out", tmp_path / name, "--threads", 1])
        assert result.exit_code == 0, text
    record = json.loads((tmp_path / "file" / "prompts.json").read_text())
    assert list(record["samples"].values()) == ["a cat", "a dog", "un café"]
    for image in ("sample_0000.png", "sample_0001.png", "sample_0002.png"):
        assert (tmp_path / "file" / image).read_bytes() == (tmp_path / "flags" / image).read_bytes()
    result, text = _invoke(["sample", art, "--prompts", tmp_path / "missing.txt", "--out", tmp_path / "m"])
    assert result.exit_code == 2 and "--prompts" in text and not (tmp_path / "m").exists()
