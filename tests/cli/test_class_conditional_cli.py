"""`tadq quantize`, `tadq sample` and `tadq evaluate` on class-conditional folders: a pixel UNet with a null class
(labels, guidance, a fitted correction) and a latent DiT pipeline whose VAE travels into the artefact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file
from tests.backends.machine import needs_int8_cpu
from tests.conftest import build_tiny_unet
from typer.testing import CliRunner

from tadq.cli.app import app

runner = CliRunner()
NUM_CLASSES = 3
NULL = NUM_CLASSES  # the extra embedding row: the unconditional branch
SMALL = ["--steps", "4", "--calib-trajectories", "8", "--set", "calibration.samples_per_step=4",
         "--set", "calibration.num_steps_kept=2"]


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result, " ".join(result.output.split())


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("classes") / "pipe"
    DDPMPipeline(unet=build_tiny_unet(num_class_embeds=NUM_CLASSES + 1),
                 scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def guided_artefact(unet_folder, tmp_path_factory):
    """Quantized at guidance 2.5 against the null class, TAC fitted at that scale."""
    out = tmp_path_factory.mktemp("q") / "guided"
    result, text = _invoke("quantize", str(unet_folder), "--out", str(out), "--preset", "W8A8", "--method", "naive",
                           "--labels", "random", "--null-class", str(NULL), "--guidance-scale", "2.5",
                           "--correct", "tac", "--set", "corrections.0.num_samples=8", *SMALL,
                           "--cache-dir", str(out.parent / "cache"))
    assert result.exit_code == 0, result.output
    assert f"labels random of {NUM_CLASSES}, null class {NULL}, guidance 2.5" in text
    return out


def test_quantize_records_the_guidance_its_corrections_were_fitted_at(guided_artefact):
    recipe = json.loads((guided_artefact / "tadq_recipe.json").read_text())
    deployment = recipe["data"]["deployments"][0]["data"]
    assert deployment["guidance_scale"] == 2.5 and deployment["null_class"] == NULL


def test_sample_and_evaluate_take_the_recorded_null_class(guided_artefact, unet_folder, tmp_path):
    """The null class was not recorded: sampling a guided artefact needed --null-class again (refused without)."""
    tensors = []
    for name, flags in (("given", ["--null-class", str(NULL)]), ("recorded", [])):
        result, _ = _invoke("sample", str(guided_artefact), "--num-samples", "4", "--class-label", "1", *flags,
                            "--out", str(tmp_path / f"{name}.png"),
                            "--tensor-out", str(tmp_path / f"{name}.safetensors"))
        assert result.exit_code == 0, result.output
        tensors.append(load_file(tmp_path / f"{name}.safetensors")["images"])
    assert torch.equal(*tensors)
    unguided, _ = _invoke("sample", str(guided_artefact), "--num-samples", "4", "--class-label", "1",
                          "--guidance-scale", "1", "--out", str(tmp_path / "unguided.png"))
    assert unguided.exit_code == 2  # TAC is fitted at 2.5: the recorded scale is what made the run above guided
    result, text = _invoke("evaluate", str(guided_artefact), "--reference", str(unet_folder), "--num-samples", "2",
                           "--steps", "4")
    assert result.exit_code == 0, result.output


def test_sample_draws_the_given_labels_at_the_fitted_guidance(guided_artefact, tmp_path):
    def run(name: str, *labels: str):
        result, text = _invoke("sample", str(guided_artefact), "--num-samples", "4", "--null-class", str(NULL),
                               *labels, "--out", str(tmp_path / f"{name}.png"),
                               "--tensor-out", str(tmp_path / f"{name}.safetensors"))
        assert result.exit_code == 0, result.output
        return load_file(tmp_path / f"{name}.safetensors"), text

    first, text = run("a", "--class-label", "0", "--class-label", "2")
    assert "class labels of the first samples: [0, 2, 0, 2]" in text and (tmp_path / "a.png").stat().st_size > 0
    assert first["class_labels"].tolist() == [0, 2, 0, 2]
    again, _ = run("b", "--class-label", "0", "--class-label", "2")
    assert torch.equal(first["images"], again["images"])  # same seed, same labels: same samples
    other, _ = run("c", "--class-label", "1")
    assert other["class_labels"].tolist() == [1] * 4
    assert not torch.equal(first["images"][0], other["images"][0])  # the label reaches the denoiser
    assert torch.equal(first["images"][1::2], run("d", "--class-label", "2")[0]["images"][1::2])  # per-sample


@pytest.mark.parametrize(("args", "message"), [
    (["--null-class", str(NULL), "--guidance-scale", "4"], "fitted at guidance_scale=2.5"),  # TAC is for 2.5
    (["--null-class", str(NULL), "--class-label", str(NULL)], "is not a class"),
    (["--null-class", "9"], "is not a label of this model"),
    (["--labels", "some"], "labels must be one of"),
    (["--labels", "random", "--class-label", "1"], "not both"),
    (["--null-class", "1"], "is not the last of this model's"),  # a real class as "no class": refused
])
def test_sample_refuses_bad_labels_before_sampling(guided_artefact, tmp_path, args, message):
    result, text = _invoke("sample", str(guided_artefact), "--num-samples", "2", *args,
                           "--out", str(tmp_path / "s.png"))
    assert result.exit_code == 2 and message in text, result.output
    assert "sampling" not in text.lower().replace("sampling in", "") and not (tmp_path / "s.png").exists()


def test_guidance_without_a_known_null_class_is_refused_before_calibration(unet_folder, tmp_path):
    result, text = _invoke("quantize", str(unet_folder), "--out", str(tmp_path / "q"), "--guidance-scale", "2",
                           *SMALL, "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 2 and "--null-class" in text, result.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "cache").exists()


def test_labels_are_refused_for_an_unconditional_model(tiny_model_dir, tmp_path):
    for command in (["quantize", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--labels", "random"],
                    ["sample", str(tiny_model_dir), "--class-label", "1", "--out", str(tmp_path / "s.png")]):
        result, text = _invoke(*command)
        assert result.exit_code == 2 and "takes no class labels" in text, result.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "s.png").exists()


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A tiny random ``DiTPipeline``: K = 10 classes, null class 10, a one-level VAE (4×8×8 latents, 3×8×8 images)."""
    from tests.pipelines.builders import build_dit

    return build_dit(tmp_path_factory.mktemp("dit") / "pipe")


def test_dit_pipeline_quantizes_samples_decoded_images_and_evaluates(dit_folder, tmp_path):
    out = tmp_path / "dit-q"
    result, text = _invoke("quantize", str(dit_folder), "--out", str(out), "--preset", "W8A8", "--method", "naive",
                           "--guidance-scale", "2", *SMALL, "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    assert "null class 10, guidance 2" in text  # the architecture's null class, no flag needed
    assert (out / "vae" / "config.json").is_file()  # the VAE travelled with the artefact, byte for byte
    assert (out / "vae" / "config.json").read_bytes() == (dit_folder / "vae" / "config.json").read_bytes()
    result, text = _invoke("sample", str(out), "--num-samples", "3", "--class-label", "7",
                           "--out", str(tmp_path / "s.png"), "--tensor-out", str(tmp_path / "s.safetensors"))
    assert result.exit_code == 0, result.output
    saved = load_file(tmp_path / "s.safetensors")
    assert "images" not in saved  # the key a text-to-image pipeline's latents have: one name for one thing
    assert saved["latents"].shape == (3, 4, 8, 8) and saved["class_labels"].tolist() == [7, 7, 7]  # latents kept
    report = tmp_path / "report"
    result, text = _invoke("evaluate", str(out), "--reference", str(dit_folder), "--num-samples", "4",
                           "--out", str(report))
    assert result.exit_code == 0, result.output
    settings = json.loads((report / "results.json").read_text())
    rows = settings["rows"]
    assert rows[1]["psnr"] is not None and rows[1]["final_mse"] > 0
    assert settings["settings"]["guidance_scale"] == 2.0


@needs_int8_cpu
def _guidance_of(tensor_file) -> float:
    with safe_open(tensor_file, "pt") as file:
        return json.loads(file.metadata()["tadq"])["meta"]["guidance_scale"]


def test_a_dit_pipeline_folder_samples_at_its_pipeline_classes_default_guidance(dit_folder, unet_folder, tmp_path):
    """An FP ``DiTPipeline`` folder sampled at guidance 1, while ``DiTPipeline.__call__`` guides at 4 (and `tadq
    sample --help` promised "the pipeline's default"). It takes the class's default now and says so; not with
    ``--labels null`` (no conditional branch), nor for an artefact (its recipe's scale, 1 here), a pipeline class
    without guidance (``DDPMPipeline``) or the shipped DiT (its measured 1.5)."""
    import inspect

    from diffusers import DiTPipeline

    from tadq.experiments.workload import class_label_setting
    from tadq.zoo.dit import DEFAULT_GUIDANCE_SCALE
    from tadq.zoo.paths import shipped_dit_path

    default = inspect.signature(DiTPipeline.__call__).parameters["guidance_scale"].default
    assert default != 1
    common = ["--num-samples", "2", "--steps", "2", "--threads", "1", "--out", str(tmp_path / "s.png")]
    cases = [(dit_folder, [], default), (dit_folder, ["--labels", "null"], 1.0),
             (dit_folder, ["--guidance-scale", "1"], 1.0), (unet_folder, [], 1.0)]
    for folder, extra, expected in cases:
        tensors = tmp_path / "s.safetensors"
        result, text = _invoke("sample", str(folder), *common, *extra, "--tensor-out", str(tensors))
        assert result.exit_code == 0, result.output
        assert _guidance_of(tensors) == expected, (folder, extra)
        assert (f"guidance {default:g}: DiTPipeline's default" in text) is (expected == default), text
    out = tmp_path / "dit-q"
    result, text = _invoke("quantize", str(dit_folder), "--out", str(out), "--preset", "W8A8", "--method", "naive",
                           "--guidance-scale", "1", *SMALL, "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    result, text = _invoke("sample", str(out), *common, "--tensor-out", str(tmp_path / "q.safetensors"))
    assert result.exit_code == 0 and _guidance_of(tmp_path / "q.safetensors") == 1.0, result.output
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(dit_folder / "transformer")
    assert class_label_setting(shipped_dit_path(), model).guidance_scale == DEFAULT_GUIDANCE_SCALE == 1.5


def test_dit_samples_record_the_backend_that_ran_them(dit_folder, tmp_path):
    """``tadq sample DIT_ART --backend B --tensor-out T`` records B in T's settings and names it in the grid's
    title, as a pipeline artefact's samples do (``prompts.json``): the file alone tells the integer model's latents
    from the simulation's. W4A8: its weight codes run on every CPU the int8 backend takes, AVX2 included."""
    out = tmp_path / "dit-q"
    result, _ = _invoke("quantize", str(dit_folder), "--out", str(out), "--preset", "W4A8", "--method", "naive",
                        *SMALL, "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    for backend in ("fake", "int8"):
        tensors = tmp_path / f"{backend}.safetensors"
        result, text = _invoke("sample", str(out), "--num-samples", "2", "--backend", backend, "--threads", "1",
                               "--out", str(tmp_path / f"{backend}.png"), "--tensor-out", str(tensors))
        assert result.exit_code == 0, result.output
        with safe_open(tensors, "pt") as handle:
            assert json.loads(handle.metadata()["tadq"])["meta"]["backend"] == backend
        assert ("[int8]" in text) == (backend == "int8"), text


@pytest.mark.parametrize(("command", "hint"), [("quantize", "--calib-prompt"), ("sample", "--prompt"),
                                               ("evaluate", "pipeline artefact"), ("analyze", "--eval-prompts"),
                                               ("sample-sharded", "tadq evaluate --eval-prompts")])
def test_a_text_conditioned_denoiser_alone_is_refused_naming_what_drives_it(tmp_path, command, hint):
    """tadq evaluate and analyze take text-to-image pipeline artefacts now: a bare text-conditioned denoiser is sent
    to its pipeline artefact, no longer to `tadq run` (and sample-sharded did not "compare" models)."""
    from tests.conftest import build_tiny_sd_unet

    from tadq.cli.common import class_conditions_for

    with pytest.raises(ValueError, match="encoder_hidden_states") as error:
        class_conditions_for(build_tiny_sd_unet(), tmp_path, command, labels=None, null_class=None,
                             guidance_scale=None)
    assert hint in str(error.value) and "tadq run" not in str(error.value)


def test_analyze_measures_a_class_conditional_artefact_as_evaluate_samples_it(unet_folder, tmp_path):
    """tadq analyze refused conditional artefacts (it had no conditioning flags). It now draws the labels from
    --seed and guides at the recipe's scale, as tadq evaluate does, so for an artefact without corrections (analyze
    measures the network alone) its measured final error is evaluate's final MSE of the same trajectories; the
    Jacobian term is that of the guided ε (both branches per FP call)."""
    guided_artefact = tmp_path / "guided"
    result, text = _invoke("quantize", str(unet_folder), "--out", str(guided_artefact), "--preset", "W8A8",
                           "--method", "naive", "--labels", "random", "--null-class", str(NULL), "--guidance-scale",
                           "2.5", *SMALL, "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    common = ("--num-samples", "4", "--batch-size", "2")
    result, text = _invoke("analyze", str(guided_artefact), "--fp-model", str(unet_folder), *common,
                           "--out", str(tmp_path / "analysis"))
    assert result.exit_code == 0, result.output
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    result, text = _invoke("evaluate", str(guided_artefact), "--reference", str(unet_folder), *common,
                           "--out", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "report" / "results.json").read_text())
    assert analysis["settings"]["guidance_scale"] == evaluated["settings"]["guidance_scale"] == 2.5  # recorded
    assert analysis["settings"]["conditions"] == evaluated["settings"]["labels"]
    # the same states, one MSE over the same float32 values: only the float64 reduction order may differ
    assert analysis["measured"][-1] == pytest.approx(evaluated["rows"][1]["final_mse"], rel=1e-9)
    assert math.isfinite(analysis["predicted_jvp"][-1]) and analysis["predicted_jvp"][-1] > 0


@pytest.mark.parametrize(("labels", "message"), [
    (["1", "-1"], "--class-label -1: a class label is an index >= 0"),  # it named the largest label, 1
    (["0", "1", "2"], "--num-samples 2 for 3 --class-label values"),  # label 2 was never sampled, silently
])
def test_sample_refuses_class_labels_it_would_not_sample_before_loading(unet_folder, tmp_path, monkeypatch, labels,
                                                                        message):
    import tadq.cli.sample

    def must_not_load(*args, **kwargs):
        raise AssertionError("LOADED-BEFORE-CHECKING")

    monkeypatch.setattr(tadq.cli.sample, "load_denoiser", must_not_load)
    flags = [part for label in labels for part in ("--class-label", label)]
    result, text = _invoke("sample", str(unet_folder), "--num-samples", "2", *flags, "--out", str(tmp_path / "s.png"))
    assert result.exit_code == 2 and message in text, result.output
    assert not (tmp_path / "s.png").exists()


def test_class_conditioning_names_the_label_outside_the_classes(unet_folder):
    """``class_conditioning`` (the library side of --class-label) named the largest label when a smaller one was
    outside the classes: "--class-label 2 is not a class" for labels [2, -1]."""
    from tadq.cli.sample import class_conditioning, load_denoiser

    denoiser, _, _ = load_denoiser(unet_folder)
    for labels, bad in (([2, -1], -1), ([0, NULL], NULL)):
        with pytest.raises(ValueError, match=rf"--class-label {bad} is not a class .*0\.\.{NUM_CLASSES - 1}"):
            class_conditioning(denoiser, unet_folder, 2, class_label=labels, labels=None, null_class=NULL,
                               guidance_scale=None, device="cpu", dtype=torch.float32)
