"""``tadq evaluate --backend``: the quality numbers of an artefact as the integer kernels run it, not only as the
float simulation does (the integer issue: "the integer model keeps the quality numbers of its recipe")."""

from __future__ import annotations

import json
import math

import pytest
from tests.backends.machine import needs_int8_cpu
from typer.testing import CliRunner

import tadq.evaluation
from tadq.backends import IntegerDenoiser
from tadq.cli.app import app

runner = CliRunner()
SMALL_FLAGS = ("--steps", "4", "--calib-trajectories", "8")


@needs_int8_cpu
def test_evaluate_samples_the_artefact_on_the_chosen_backend(tmp_path, tiny_model_dir, monkeypatch):
    """W4A8 (codes within ±15: exact on every oneDNN CPU, AVX2 included) evaluated with ``--backend int8``: the model
    sampled is the integer one, the report names the backend, and the FP reference is the same as with ``fake``."""
    artefact = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--preset", "W4A8", "--out", str(artefact),
                                 "--cache-dir", str(tmp_path / "cache"), *SMALL_FLAGS])
    assert result.exit_code == 0, result.output
    sampled = []
    original = tadq.evaluation.evaluate_against_reference

    def spy(qmodel, *args, **kwargs):
        sampled.append(qmodel)
        return original(qmodel, *args, **kwargs)

    monkeypatch.setattr(tadq.evaluation, "evaluate_against_reference", spy)
    reports = {}
    for backend in ("fake", "int8"):
        out = tmp_path / f"report-{backend}"
        result = runner.invoke(app, ["evaluate", str(artefact), "--reference", str(tiny_model_dir), "--num-samples",
                                     "6", "--steps", "3", "--backend", backend, "--out", str(out)])
        assert result.exit_code == 0, result.output
        reports[backend] = json.loads((out / "results.json").read_text())
    assert not isinstance(sampled[0], IntegerDenoiser)
    assert isinstance(sampled[1], IntegerDenoiser) and sampled[1].backend == "int8"
    fake, integer = reports["fake"], reports["int8"]
    assert fake["settings"]["backend"] == "fake" and integer["settings"]["backend"] == "int8"
    assert integer["rows"][1]["method"].endswith("[int8]") and "[" not in fake["rows"][1]["method"]
    assert integer["rows"][0] == fake["rows"][0]  # the FP reference: same model, same noise
    assert math.isfinite(integer["rows"][1]["psnr"]) and integer["rows"][1]["final_mse"] > 0.0


@pytest.mark.parametrize("args, message", [
    (("--backend", "int4"), "int4"),  # unknown: named with the known ones
    (("--backend", "int8-cuda"), "int8-cuda"),  # no CUDA in the test machines' torch, or not placed on it
])
def test_evaluate_refuses_a_backend_it_cannot_run_before_reading_the_artefact(tmp_path, args, message):
    """The folder does not even exist: the refusal comes first, before any model is read."""
    result = runner.invoke(app, ["evaluate", str(tmp_path / "missing"), *args])
    assert result.exit_code == 2 and message in result.output and "does not exist" not in result.output, \
        result.output


def test_evaluate_refuses_an_integer_backend_in_bfloat16(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path / "missing"), "--backend", "int8", "--dtype", "bfloat16"])
    assert result.exit_code == 2, result.output
    assert "float32" in result.output or "not available" in result.output  # no oneDNN: refused as unavailable


@needs_int8_cpu
def test_evaluate_refuses_8_bit_weights_where_the_kernels_saturate_before_sampling(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    """As on an AVX2 CPU (the measured bound patched to ±64 here, so every machine runs the refusal): a W8A8
    artefact on ``--backend int8`` is refused by its weight codes before any model is sampled or a report written,
    never evaluated as the simulation."""
    from tadq.backends import capability

    artefact = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--preset", "W8A8", "--out", str(artefact),
                                 "--cache-dir", str(tmp_path / "cache"), *SMALL_FLAGS])
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(capability, "int8_cpu_weight_bound", lambda: capability.PAIR_SATURATION_BOUND)
    monkeypatch.setattr(tadq.evaluation, "evaluate_against_reference", lambda *a, **k: pytest.fail("sampled"))
    out = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", str(artefact), "--reference", str(tiny_model_dir), "--num-samples", "4",
                                 "--steps", "3", "--backend", "int8", "--out", str(out)])
    assert result.exit_code == 2 and "8-bit weights have codes" in result.output and "±64" in result.output, \
        result.output
    assert not out.exists()


@needs_int8_cpu
def test_a_class_conditional_artefact_on_int8_is_printed_under_its_backend(tmp_path):
    """A class-conditional W4A8 artefact with guidance on ``--backend int8``: the printed table names the backend as
    results.json does (rich read ``[int8]`` as a markup tag and printed the row as the float simulation's)."""
    from diffusers import DDPMPipeline, DDPMScheduler
    from tests.conftest import build_tiny_unet

    source, artefact, out = tmp_path / "fp", tmp_path / "q", tmp_path / "report"
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=build_tiny_unet(num_class_embeds=4), scheduler=scheduler).save_pretrained(source)
    result = runner.invoke(app, ["quantize", str(source), "--preset", "W4A8", "--out", str(artefact), "--cache-dir",
                                 str(tmp_path / "cache"), "--guidance-scale", "2", "--null-class", "3", *SMALL_FLAGS])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(artefact), "--reference", str(source), "--num-samples", "3",
                                 "--batch-size", "2", "--backend", "int8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["guidance_scale"] == 2.0 and report["settings"]["labels"] is not None
    method = report["rows"][1]["method"]
    assert method.endswith("[int8]") and method in result.output, result.output


@pytest.fixture(scope="module")
def pipeline_artefact(tmp_path_factory):
    """(a W4A8 text-to-image artefact, the FP pipeline folder it was quantized from)."""
    from tests.pipelines.builders import build_sd

    root = tmp_path_factory.mktemp("t2i")
    artefact, source = root / "q", build_sd(root / "sd")
    result = runner.invoke(app, ["quantize", str(source), "--preset", "W4A8", "--out", str(artefact),
                                 "--cache-dir", str(root / "cache"), "--steps", "2", "--calib-trajectories", "2",
                                 "--calib-prompt", "a cat"])
    assert result.exit_code == 0, result.output
    return artefact, source


@pytest.mark.parametrize("backend", ["fake", pytest.param("int8", marks=needs_int8_cpu)])
def test_a_text_to_image_artefact_is_evaluated_on_prompts_with_the_chosen_backend(tmp_path, pipeline_artefact,
                                                                                   backend, monkeypatch):
    """`tadq evaluate` refused text-to-image artefacts, pointing to `tadq run` (which quantizes again); it scores
    one on evaluation prompts now, run by the chosen backend. Missing prompts for a user's reference are refused
    before the pipeline is loaded (and converted to the integer kernels)."""
    import tadq.pipelines

    artefact, source = pipeline_artefact
    prompts, report = tmp_path / "eval.txt", tmp_path / "report"
    prompts.write_text("a dog\n")
    args = ["evaluate", str(artefact), "--reference", str(source), "--backend", backend, "--out", str(report)]
    with monkeypatch.context() as patch:
        patch.setattr(tadq.pipelines, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
        result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--eval-prompts" in result.output, result.output
    assert not report.exists()
    result = runner.invoke(app, [*args, "--eval-prompts", str(prompts), "--num-samples", "2"])
    assert result.exit_code == 0, result.output
    results = json.loads((report / "results.json").read_text())
    assert results["settings"]["prompts"] == ["a dog"] and results["settings"]["backend"] == backend
    assert results["rows"][1]["method"].endswith("[int8]") == (backend == "int8")
    assert math.isfinite(results["rows"][1]["psnr"]) and results["rows"][0]["final_mse"] == 0.0


def test_a_missing_reference_is_named_before_the_artefact_is_loaded(tmp_path, monkeypatch):
    import tadq.io

    monkeypatch.setattr(tadq.io, "load_quantized", lambda *a, **k: pytest.fail("loaded"))
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--reference", str(tmp_path / "gone")])
    assert result.exit_code == 2 and "--reference" in result.output and "gone" in result.output, result.output


def test_analyze_measures_a_text_to_image_artefact_on_the_prompts_evaluate_samples(tmp_path, pipeline_artefact):
    """tadq analyze refused text-to-image artefacts; on evaluation prompts (the same embeddings, guidance and
    sampler as tadq evaluate) its measured final latent error equals evaluate's final MSE for an artefact without
    corrections, and the report names the prompts' conditions."""
    artefact, source = pipeline_artefact
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a dog\nthe cat\n")
    common = ["--eval-prompts", str(prompts), "--num-samples", "3", "--batch-size", "2"]
    result = runner.invoke(app, ["analyze", str(artefact), "--fp-model", str(source), *common,
                                 "--out", str(tmp_path / "analysis")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(artefact), "--reference", str(source), *common,
                                 "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    evaluated = json.loads((tmp_path / "report" / "results.json").read_text())
    assert analysis["settings"]["conditions"] == evaluated["settings"]["conditions"] is not None
    # the same latents, one MSE over the same float32 values: only the float64 reduction order may differ
    assert analysis["measured"][-1] == pytest.approx(evaluated["rows"][1]["final_mse"], rel=1e-9)


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_sampling_flags_a_text_to_image_artefact_cannot_take_are_refused_before_it_is_loaded(
        tmp_path, pipeline_artefact, monkeypatch, command):
    """A sampler of the other family (flow-euler on this ε model) or a negative guidance scale was refused only
    once the artefact's pipeline had been read (`tadq sample` refuses them before); now before it, too."""
    import tadq.pipelines

    artefact, source = pipeline_artefact
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a dog\n")
    reference = "--reference"  # both commands (analyze also reads its older name, --fp-model)
    monkeypatch.setattr(tadq.pipelines, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
    for flags, needle in ((["--sampler", "flow-euler"], "flow"), (["--guidance-scale", "-1"], "guidance")):
        result = runner.invoke(app, [command, str(artefact), reference, str(source), "--eval-prompts", str(prompts),
                                     "--num-samples", "2", *flags, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and needle in result.output, result.output
