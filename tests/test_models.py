import json
import logging

import pytest
import torch

from tadq.models import load_pipeline_parts, load_scheduler, shipped_model_path


def test_loads_pipeline_and_bare_model_folders(tmp_path, tiny_model_dir, tiny_unet):
    model, scheduler = load_pipeline_parts(tiny_model_dir)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_unet.state_dict().values(),
                                                 strict=True))
    assert not any(p.requires_grad for p in model.parameters())
    assert scheduler.config.num_train_timesteps == 1000
    bare, _ = load_pipeline_parts(tiny_model_dir / "unet")
    with torch.no_grad():
        assert torch.equal(bare(x, t).sample, model(x, t).sample)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pipeline_parts(tmp_path / "nope")


def test_non_diffusers_folder_raises(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        load_pipeline_parts(tmp_path)


def test_unsupported_class_raises(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="supported"):
        load_pipeline_parts(tmp_path)


def test_shipped_model_is_packaged():
    assert (shipped_model_path() / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (shipped_model_path() / "scheduler" / "scheduler_config.json").exists()


def test_quantized_artefact_points_to_tadq_load(tmp_path, tiny_model_dir):
    (tiny_model_dir / "tadq_config.json").write_text("{}")
    with pytest.raises(ValueError, match="tadq.load"):
        load_pipeline_parts(tiny_model_dir)


def test_a_pipeline_that_lost_its_scheduler_is_refused(tiny_model_dir):
    """model_index.json names a scheduler whose folder is gone: the schedule (betas, v-prediction...) is not
    replaced by DDPM defaults; a bare model folder, which never had one, still loads (with a warning)."""
    import shutil

    shutil.rmtree(tiny_model_dir / "scheduler")
    with pytest.raises(ValueError, match=r"names a scheduler \(.*DDPMScheduler.*scheduler_config\.json is missing"):
        load_pipeline_parts(tiny_model_dir)
    load_pipeline_parts(tiny_model_dir / "unet")


def test_a_denoiser_folder_without_its_config_is_named(tiny_model_dir):
    (tiny_model_dir / "unet" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"unet/config\.json is missing: .*names the denoiser folder 'unet'"):
        load_pipeline_parts(tiny_model_dir)


def test_reading_a_prompt_pipelines_scheduler_does_not_announce_a_denoiser_loaded_alone(caplog):
    """``load_scheduler`` logged "loading its unet and scheduler only" for a text-to-image folder: `tadq sample`
    printed it twice (its sampler checks) and then loaded the whole pipeline."""
    t2i = shipped_model_path().parent / "digits-t2i"
    note = "and scheduler only"
    with caplog.at_level(logging.INFO, logger="tadq"):
        load_scheduler(t2i)
    assert note not in caplog.text
    with caplog.at_level(logging.INFO, logger="tadq"):
        load_pipeline_parts(t2i)  # the denoiser without its text encoder: still said
    assert caplog.text.count(note) == 1, caplog.text


def test_a_folder_without_a_scheduler_is_warned_about_once(tmp_path, tiny_unet, caplog):
    """A bare ``UNet2DModel.save_pretrained`` folder runs on DDPM's default schedule: `tadq quantize` said so three
    times in a row (its sampler checks read the scheduler, then the model loaded)."""
    tiny_unet.save_pretrained(tmp_path / "unet-only")
    with caplog.at_level(logging.WARNING, logger="tadq"):
        load_scheduler(tmp_path / "unet-only")
        load_scheduler(tmp_path / "unet-only")
        load_pipeline_parts(tmp_path / "unet-only")
    assert caplog.text.count("using DDPM defaults") == 1, caplog.text


def test_a_folder_of_an_unsupported_class_is_refused_before_its_missing_scheduler_is_warned_about(tmp_path, caplog):
    """`tadq quantize` on a bare folder of a class without an adapter (a SanaTransformer2DModel) first warned "no
    scheduler_config.json ...; using DDPM defaults" and only then refused the class: a warning about a model tadq
    would not load at all. The scheduler check reaches the class refusal first now."""
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel"}))
    with caplog.at_level(logging.WARNING, logger="tadq"), pytest.raises(ValueError, match="SanaTransformer2DModel"):
        load_scheduler(tmp_path)
    assert "DDPM defaults" not in caplog.text
