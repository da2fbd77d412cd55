import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.cli.quantize import QuantFlags, resolve_config, resolve_recipe
from tadq.config import CalibrationConfig, QuantConfig, config_to_dict
from tadq.sampling import SamplerConfig

runner = CliRunner()
SMALL_CALIB = CalibrationConfig(sampler=SamplerConfig(kind="ddim", num_steps=4), num_trajectories=8,
                                num_steps_kept=2, samples_per_step=4, batch_size=8)


def _write_config(path: Path, **fields) -> Path:
    config = QuantConfig.from_preset("W8A8", calibration=SMALL_CALIB, **fields)
    path.write_text(json.dumps(config_to_dict(config)))
    return path


# a calibration small enough for a tiny model (the defaults record 256 trajectories of 50 steps)
SMALL_FLAGS = ("--steps", "4", "--calib-trajectories", "8")


def _quantize(tmp_path: Path, model_dir: Path, *extra: str):
    out = tmp_path / "q"
    args = ["quantize", str(model_dir), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra]
    return runner.invoke(app, args), out


def test_help_lists_the_new_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert all(name in result.output for name in ("quantize", "sample", "evaluate"))


def test_quantize_sample_evaluate_end_to_end(tmp_path, tiny_model_dir):
    config_file = _write_config(tmp_path / "config.json", exclude=("conv_in",))
    result, out = _quantize(tmp_path, tiny_model_dir, "--config", str(config_file), "--preset", "W4A8")
    assert result.exit_code == 0, result.output
    assert "artefact" in result.output and "vs FP" in result.output
    saved = json.loads((out / "tadq_config.json").read_text())["quant_config"]["data"]
    assert saved["weights"]["data"]["bits"] == 4 and saved["exclude"] == ["conv_in"]  # flag over file, file kept
    assert saved["calibration"]["data"]["num_trajectories"] == 8

    result = runner.invoke(app, ["sample", str(out), "--num-samples", "4", "--steps", "3",
                                 "--out", str(tmp_path / "s.png"), "--tensor-out", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").stat().st_size > 0
    assert load_file(tmp_path / "s.safetensors")["images"].shape == (4, 1, 8, 8)

    result = runner.invoke(app, ["sample", str(tiny_model_dir), "--num-samples", "2", "--steps", "3",
                                 "--out", str(tmp_path / "fp.png")])
    assert result.exit_code == 0, result.output
    assert "FP" in result.output

    report = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", str(out), "--reference", str(tiny_model_dir), "--num-samples", "8",
                                 "--steps", "3", "--out", str(report), "--features", "digits"])
    assert result.exit_code == 0, result.output
    assert "W4A8" in result.output and "floor" in result.output
    rows = json.loads((report / "results.json").read_text())["rows"]
    assert rows[0]["final_mse"] == 0.0 and rows[1]["final_mse"] > 0.0 and rows[1]["psnr"] is not None
    assert rows[1]["fd_digits"] > 0
    # 8 samples of the classifier's 128 features: the report says the FD rests on the ridge (it was a plain number)
    assert "8 samples of 128 features" in (report / "results.md").read_text()
    assert "rank at most 7 < 128" in " ".join(result.output.split())
    # a user's model without --features: PSNR/SSIM/trajectory error only, and it says so
    result = runner.invoke(app, ["evaluate", str(out), "--reference", str(tiny_model_dir), "--num-samples", "4",
                                 "--steps", "3", "--out", str(tmp_path / "plain")])
    assert result.exit_code == 0 and "not computed" in result.output, result.output
    rows = json.loads((tmp_path / "plain" / "results.json").read_text())["rows"]
    assert rows[1]["fd"] is None and rows[1]["agreement"] is None and rows[1]["psnr"] is not None
    header = (tmp_path / "plain" / "results.md").read_text().splitlines()[0]  # the printed table's columns
    assert "FD ↓" in header and "FD-digits" not in header and "sample (s)" not in header
    assert (report / "samples.png").exists() and (report / "per_step_error.png").exists()

    analysis = tmp_path / "analysis"
    result = runner.invoke(app, ["analyze", str(out), "--fp-model", str(tiny_model_dir), "--num-samples", "4",
                                 "--steps", "3", "--out", str(analysis)])
    assert result.exit_code == 0, result.output
    report = json.loads((analysis / "analysis.json").read_text())
    assert len(report["measured"]) == 4 and report["measured"][0] == 0.0 and report["measured"][-1] > 0.0
    assert len(report["final_share"]) == 3 and report["predicted_jvp"] is not None
    assert (analysis / "propagation.png").stat().st_size > 0
    result = runner.invoke(app, ["analyze", str(tiny_model_dir), "--out", str(analysis)])
    assert result.exit_code == 2 and "not a tadq artefact" in result.output


def test_flags_override_the_config_file(tmp_path):
    config_file = _write_config(tmp_path / "c.json", keep_fp_roles=("output_conv",))
    flags = QuantFlags(preset="w4a4", method="qdiffusion", steps=2, calib_seed=7, calib_trajectories=2)
    config = resolve_config(config_file, flags)
    assert (config.label, config.method, config.keep_fp_roles) == ("W4A4", "qdiffusion", ("output_conv",))
    calib = config.calibration
    assert (calib.sampler.num_steps, calib.seed, calib.num_trajectories) == (2, 7, 2)
    assert (calib.num_steps_kept, calib.samples_per_step) == (2, 2)  # capped to what the flags allow
    assert resolve_config(None, QuantFlags()).label == "W8A8"


def test_a_preset_name_with_surrounding_blanks_is_read_as_the_comma_lists_read_it():
    """``tadq run --presets " w4a8"`` and recipe files strip and upper-case a preset name; ``tadq quantize --preset
    " W4A8"`` refused it as an unknown preset."""
    flags = QuantFlags(preset=" w4a8\n")
    assert resolve_config(None, flags).preset_name == resolve_recipe(None, None, flags).preset_name == "W4A8"
    assert resolve_config(None, flags).weights == resolve_config(None, QuantFlags(preset="W4A8")).weights


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "W3A9"], "unknown preset"),
    (["--method", "magic"], "method must be"),
    (["--config", "missing.json"], "does not exist"),
])
def test_bad_quantize_input_is_a_clean_error(tmp_path, tiny_model_dir, args, message):
    result, out = _quantize(tmp_path, tiny_model_dir, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_missing_model_dir_leaves_no_output(tmp_path):
    result, out = _quantize(tmp_path, tmp_path / "nope")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not out.exists()


def test_existing_output_is_not_touched(tmp_path, tiny_model_dir):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    result, out = _quantize(tmp_path, tiny_model_dir)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_sample_and_evaluate_reject_bad_folders(tmp_path, tiny_model_dir):
    result = runner.invoke(app, ["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and not (tmp_path / "s.png").exists()
    result = runner.invoke(app, ["evaluate", str(tiny_model_dir), "--reference", str(tiny_model_dir),
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not a tadq artefact" in result.output
    assert not (tmp_path / "r").exists()
    result = runner.invoke(app, ["sample", str(tiny_model_dir), "--device", "cuda"])
    assert result.exit_code == 2


@pytest.mark.parametrize("flag", ["--num-samples", "--batch-size"])
def test_evaluate_refuses_a_zero_count_by_its_flag_before_loading(tmp_path, flag):
    """``tadq evaluate --batch-size 0`` loaded both models and started sampling the FP one before
    ``tadq.sample`` refused "num_samples and batch_size must be >= 1": the flag is named now, before any work
    (the artefact folder does not even exist here)."""
    result = runner.invoke(app, ["evaluate", str(tmp_path / "not-yet"), flag, "0"])
    assert result.exit_code == 2 and f"{flag} must be >= 1" in result.output, result.output


def test_quantize_refuses_two_disagreeing_guidance_scales(tmp_path):
    """``--guidance-scale 2 --set deployments.0.guidance_scale=3``: the flag silently won over the --set; now they
    must agree (or only one is given)."""
    result = runner.invoke(app, ["quantize", "--guidance-scale", "2", "--set", "deployments.0.guidance_scale=3",
                                 "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and "disagree" in result.output and not (tmp_path / "q").exists(), result.output


@pytest.mark.slow  # ≈ 15 s (an Inception network built and run): `make test-slow`
def test_evaluate_reports_inception_fid_from_a_local_file(tmp_path, tiny_model_dir):
    from torch import nn

    class TinyInception(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3 * 4 * 4, 8)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            features = self.proj(torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1))
            return features if return_features else features.softmax(dim=1)

    weights = tmp_path / "inception.pt"
    torch.jit.script(TinyInception()).save(str(weights))
    result, out = _quantize(tmp_path, tiny_model_dir, "--preset", "W8A8", *SMALL_FLAGS)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(out), "--reference", str(tiny_model_dir), "--num-samples", "6",
                                 "--steps", "3", "--inception-weights", str(weights), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert result.output.count("vs real digits") == 2  # FP and quantized, each on its own line
    header = (tmp_path / "r" / "results.md").read_text().splitlines()[0]
    assert "Inception FID" in header and "quantize (s)" not in header
    missing = runner.invoke(app, ["evaluate", str(out), "--reference", str(tiny_model_dir), "--num-samples", "6",
                                  "--steps", "3", "--inception-weights", str(tmp_path / "nope.pt")])
    assert missing.exit_code == 2


def test_sample_defaults_to_the_shipped_model(tmp_path):
    result = runner.invoke(app, ["sample", "--num-samples", "4", "--steps", "3", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").stat().st_size > 0


def test_qdiffusion_flags_reach_the_config(tmp_path, tiny_model_dir):
    result, out = _quantize(tmp_path, tiny_model_dir, "--preset", "W4A8", "--method", "qdiffusion",
                            "--split-shortcut", "--quantize-attention", "--recon-iters", "3",
                            "--recon-activation-iters", "2", *SMALL_FLAGS)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "tadq_config.json").read_text())["quant_config"]["data"]
    assert saved["method"] == "qdiffusion" and saved["split_shortcut"] and saved["quantize_attention"]
    assert saved["reconstruction"]["data"]["weight_iters"] == 3
    assert saved["reconstruction"]["data"]["activation_iters"] == 2
    qmap = json.loads((out / "tadq_quant_map.json").read_text())
    assert any("split_deep_channels" in entry for entry in qmap.values())


def test_fp_layers_default_to_first_last_for_a_preset_and_keep_a_files_own(tmp_path):
    from tadq.cli.quantize import resolve_recipe

    assert resolve_recipe(None, None, QuantFlags(), {}).keep_fp_roles == ("input_conv", "output_conv")
    assert resolve_config(None, QuantFlags()).keep_fp_roles == ("input_conv", "output_conv")
    assert resolve_recipe(None, None, QuantFlags(fp_layers="none"), {}).keep_fp_roles == ()
    assert resolve_recipe(None, None, QuantFlags(keep_fp_roles=("output_conv",)), {}).keep_fp_roles == (
        "output_conv",)
    config_file = _write_config(tmp_path / "c.json", keep_fp_roles=())
    assert resolve_recipe(None, config_file, QuantFlags(), {}).keep_fp_roles == ()  # the file's own choice
    assert resolve_config(config_file, QuantFlags(fp_layers="first_last_time")).keep_fp_roles == (
        "input_conv", "output_conv", "time_embedding")
    with pytest.raises(ValueError, match="not both"):
        resolve_recipe(None, None, QuantFlags(fp_layers="none", keep_fp_roles=("output_conv",)), {})
    with pytest.raises(ValueError, match="unknown fp_layers"):
        resolve_recipe(None, None, QuantFlags(fp_layers="last"), {})


def test_quantize_an_fp8_preset_then_sample_on_fake_and_refuse_int8(tmp_path, tiny_model_dir):
    """``tadq quantize --preset w4a8-fp8`` writes an artefact whose config holds the fp8 activations (it loads
    and samples on the fake backend: tests/test_io.py); an integer backend refuses it, naming the format."""
    result, out = _quantize(tmp_path, tiny_model_dir, "--preset", "w4a8-fp8", "--steps", "2",
                            "--calib-trajectories", "2")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "tadq_config.json").read_text())["quant_config"]["data"]
    assert config["preset_name"] == "W4A8-FP8" and config["activations"]["data"]["format"] == "fp8_e4m3"
    assert "format" not in config["weights"]["data"]
    result = runner.invoke(app, ["sample", str(out), "--num-samples", "2", "--steps", "3", "--backend", "int8",
                                 "--out", str(tmp_path / "i.png")])
    assert result.exit_code != 0 and "fp8_e4m3" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "i.png").exists()


def test_quantize_a_block_wise_preset_then_sample_on_fake_and_refuse_int8(tmp_path, tiny_model_dir):
    """``tadq quantize --preset w4a8-g16`` writes weights with one step per block of 16 (steps shaped (rows,
    blocks) in the artefact), samples on the fake backend, and an integer backend refuses it naming the blocks."""
    result, out = _quantize(tmp_path, tiny_model_dir, "--preset", "w4a8-g16", "--steps", "2",
                            "--calib-trajectories", "2")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "tadq_config.json").read_text())["quant_config"]["data"]
    assert config["preset_name"] == "W4A8-G16"
    assert config["weights"]["data"]["granularity"] == "per_block" and config["weights"]["data"]["group_size"] == 16
    result = runner.invoke(app, ["sample", str(out), "--num-samples", "2", "--steps", "3", "--out",
                                 str(tmp_path / "f.png")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sample", str(out), "--num-samples", "2", "--steps", "3", "--backend", "int8",
                                 "--out", str(tmp_path / "i.png")])
    assert result.exit_code != 0 and "block of 16 weights" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "i.png").exists()


def test_a_grid_beyond_the_training_timesteps_is_refused_in_one_line_before_any_forward(tmp_path):
    """``--steps`` equal to the training timesteps on a 'leading' schedule with steps_offset=1 (Stable Diffusion's)
    starts the grid at t = N_train: ``tadq quantize`` ended in an IndexError traceback from the step constants."""
    from diffusers import DDPMPipeline, DDPMScheduler
    from tests.conftest import build_tiny_unet

    folder = tmp_path / "offset"
    DDPMPipeline(unet=build_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10, steps_offset=1)) \
        .save_pretrained(folder)
    result = runner.invoke(app, ["quantize", str(folder), "--steps", "10", "--calib-trajectories", "2",
                                 "--threads", "1", "--out", str(tmp_path / "q")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, (result.output, result.exception)
    assert "visits timestep(s) 10, outside the model's 10 training timesteps (0 to 9); use 9 steps" in text
    assert not (tmp_path / "q").exists()
