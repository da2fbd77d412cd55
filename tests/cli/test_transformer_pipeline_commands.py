"""The rest of the command line on the transformer text-to-image pipelines (PixArt-α, SD3, Flux) and their
artefacts, as a user runs it: ``tadq bench``, ``tadq recipe``, ``tadq sample-sharded``, ``tadq sample --backend
int8-compiled``, ``tadq verify``, ``tadq quantize --recipe/--set/--correct`` and ``tadq run`` with corrections.

``tests/pipelines/test_transformer_pipelines.py`` and ``test_transformer_pipeline_inputs.py`` cover quantize →
sample, ``load_pipeline`` and ``tadq run`` basics; nothing here repeats them. Each test says in its docstring what
a user expects: the first group was found failing and fixed, the last pins behaviour that could silently
regress. Everything is tiny (8×8 latents, 1–2 steps, 2 samples, one thread) and written inside
``tmp_path``.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.backends.machine import needs_compiled_w8
from tests.conftest import build_tiny_unet
from tests.pipelines.builders_transformer import build_flux, build_pixart, build_sd3
from typer.testing import CliRunner

from tadq.cli.app import app

runner = CliRunner()
CALIB_PROMPTS = ("a cat", "a red dog")
EVAL_PROMPTS = ("a blue cat", "a dog")
FLUX_DISTILLED = 2.5  # the Flux artefact's embedded guidance: not the 3.5 default, so a substitution shows


def _invoke(args) -> tuple[object, str]:
    """Run ``tadq ARGS`` in-process; (result, its output on one line)."""
    result = runner.invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


def _recipe_json(artefact) -> dict:
    """The ``data`` of an artefact's ``tadq_recipe.json`` (or of a search's ``recipe.json``)."""
    file = artefact / "tadq_recipe.json" if (artefact / "tadq_recipe.json").is_file() else artefact / "recipe.json"
    return json.loads(file.read_text())["data"]


def _deployment(artefact) -> dict:
    return _recipe_json(artefact)["deployments"][0]["data"]


def _sampler(artefact, where: str = "deployment") -> dict:
    data = _recipe_json(artefact)
    holder = data["deployments"][0]["data"] if where == "deployment" else data["calibration"]["data"]
    return holder["sampler"]["data"]


def _quantize(folder, out, tmp_path, *extra) -> list:
    """A tiny ``tadq quantize`` of a pipeline folder (naive W8A8, 2 flow/DPM steps, 2 calibration prompts)."""
    return ["quantize", folder, "--out", out, "--preset", "W8A8", "--method", "naive", "--steps", 2,
            "--calib-trajectories", 2, "--calib-prompt", CALIB_PROMPTS[0], "--calib-prompt", CALIB_PROMPTS[1],
            "--cache-dir", tmp_path / "cache", "--threads", 1, *extra]


def _search(folder, out, prompts, *extra) -> list:
    """A tiny ``tadq recipe`` search: one candidate (naive W8A8, no corrections), 2 trajectories everywhere."""
    return ["recipe", folder, "--out", out, "--budget-bits", "W8A8", "--presets", "W8A8", "--bases", "naive",
            "--stacks", "none", "--steps", 2, "--calib-trajectories", 2, "--fit-trajectories", 2,
            "--selection-samples", 2, "--heldout", 2, "--batch-size", 2, "--calib-prompts", prompts["calib"],
            "--eval-prompts", prompts["eval"], "--threads", 1, *extra]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer-commands")
    return {"pixart": build_pixart(root / "pixart"), "sd3": build_sd3(root / "sd3"), "flux": build_flux(root / "flux")}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer-command-prompts")
    (root / "calib.txt").write_text("\n".join(CALIB_PROMPTS) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    return {"calib": root / "calib.txt", "eval": root / "eval.txt"}


@pytest.fixture(scope="module")
def artefacts(folders, tmp_path_factory):
    """``tadq quantize`` artefacts: SD3 at guidance 3, Flux at the distilled scale ``FLUX_DISTILLED``."""
    root = tmp_path_factory.mktemp("transformer-command-artefacts")
    made = {}
    for which, extra in (("sd3", ["--sampler", "flow-euler", "--guidance-scale", 3]),
                         ("flux", ["--sampler", "flow-euler", "--distilled-guidance", FLUX_DISTILLED])):
        result, output = _invoke(_quantize(folders[which], root / which, root, *extra))
        assert result.exit_code == 0, output
        made[which] = root / which
    return made


# --- problems: each test fails until the problem it describes is fixed ---------------------------------------------


def test_bench_refusal_of_a_pipeline_folder_names_only_flags_bench_has(folders, tmp_path):
    """``tadq bench --model SD3_FOLDER`` stops with "give calibration and evaluation prompts (two disjoint sets, e.g.
    --calib-prompts FILE --eval-prompts FILE)", but ``tadq bench`` has no such options ("No such option:
    --calib-prompts" when the user follows the advice): the message is ``load_workload``'s, written for ``tadq
    run`` and ``tadq recipe``. A user expects bench either to take the prompts or to say that it cannot bench this
    folder and what can (``tadq run --model FOLDER --calib-prompts ... --eval-prompts ...``)."""
    result, output = _invoke(["bench", "--model", folders["sd3"], "--methods", "naive", "--presets", "W8A8",
                              "--samplers", "flow-euler", "--steps", 1, "--num-samples", 2, "--calib-trajectories", 2,
                              "--batch-size", 2, "--out", tmp_path / "bench", "--cache-dir", tmp_path / "cache",
                              "--threads", 1])
    if result.exit_code == 0:  # bench learned to take prompts: nothing to check here
        return
    assert result.exit_code == 2 and not (tmp_path / "bench").exists(), output
    _, help_text = _invoke(["bench", "--help"])
    if "tadq run" in output:  # pointing at the command that takes prompts: its flags count too
        help_text += _invoke(["run", "--help"])[1]
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", output))
    assert named <= set(re.findall(r"--[a-z][a-z-]*", help_text)), f"flags no named command has: {output}"


@pytest.mark.parametrize("command", ["run", "bench"])
def test_run_and_bench_sample_a_flow_model_with_flow_euler_when_no_sampler_is_named(folders, prompts, tmp_path,
                                                                                      command):
    """``tadq run`` and ``tadq bench`` on an SD3 folder without ``--sampler(s)`` stopped with "sampler 'ddim' cannot
    drive a flow-matching model ... use flow-euler": their default (DDIM, every table's sampler) was applied to a
    model DDIM cannot drive, while ``tadq recipe`` on the same folder picks flow-euler. A user expects the commands
    to agree and to run the folder's flow sampler, naming it in the report."""
    out = tmp_path / command
    result, output = _invoke([command, "--model", folders["sd3"], "--methods", "naive", "--presets", "W8A8",
                              "--steps", 1, "--num-samples", 2, "--calib-trajectories", 2, "--batch-size", 2,
                              "--out", out, "--cache-dir", tmp_path / "cache", "--threads", 1,
                              "--calib-prompts", prompts["calib"], "--eval-prompts", prompts["eval"]])
    assert result.exit_code == 0, output
    if command == "run":
        assert json.loads((out / "results.json").read_text())["config"]["sampler"]["data"]["kind"] == "flow-euler"
    else:
        assert "--samplers flow-euler" in json.loads((out / "report.json").read_text())["command"]


def test_quantize_calibrates_a_flow_model_on_flow_euler_when_no_sampler_is_named(folders, tmp_path):
    """``tadq quantize SD3_FOLDER`` without ``--sampler`` took the preset's DDIM and stopped with "use flow-euler";
    like run, bench and recipe it now calibrates on (and records) the folder's flow sampler. A sampler the user
    names (here through --set) is kept, and refused where it cannot drive the model."""
    out = tmp_path / "q"
    result, output = _invoke(_quantize(folders["sd3"], out, tmp_path))
    assert result.exit_code == 0, output
    assert _sampler(out)["kind"] == _sampler(out, "calibration")["kind"] == "flow-euler"
    result, output = _invoke(_quantize(folders["sd3"], tmp_path / "ddim", tmp_path, "--set", "sampler.kind=ddim"))
    assert result.exit_code == 2 and "flow-euler" in output and not (tmp_path / "ddim").exists(), output


def test_bench_takes_a_pipeline_folders_prompts_and_regenerates_with_them(folders, prompts, tmp_path):
    """``tadq bench`` on an SD3 folder with ``tadq run``'s prompt options runs its rows on decoded images, and the
    report's regenerating command names the prompt files and the guidance scale it ran with."""
    out = tmp_path / "bench"
    result, output = _invoke(["bench", "--model", folders["sd3"], "--methods", "naive", "--presets", "W8A8",
                              "--samplers", "flow-euler", "--steps", 1, "--num-samples", 2, "--calib-trajectories", 2,
                              "--batch-size", 2, "--out", out, "--cache-dir", tmp_path / "cache", "--threads", 1,
                              "--calib-prompts", prompts["calib"], "--eval-prompts", prompts["eval"],
                              "--guidance-scale", 2])
    assert result.exit_code == 0, output
    report = json.loads((out / "report.json").read_text())
    command = report["command"]
    assert f"--calib-prompts {prompts['calib']}" in command and f"--eval-prompts {prompts['eval']}" in command
    assert "--guidance-scale 2.0" in command
    assert any(row.get("psnr") is not None for row in report["rows"])


def test_bench_help_names_the_flux_grid_sampler():
    """docs/pipelines.md gives FluxPipeline's σ grid the bench name ``flow-euler-uniform`` and ``parse_sampler``
    takes it, but ``tadq bench --help`` lists "flow-euler, flow-euler-shift<s>" only: a user reading the help cannot
    find the name of the grid a Flux model samples with."""
    _, help_text = _invoke(["bench", "--help"])
    assert "uniform" in help_text, help_text


def test_recipe_searches_an_sd3_folder_on_its_flow_sampler(folders, prompts, tmp_path):
    """``tadq recipe SD3_FOLDER --budget-bits W8A8 --calib-prompts ... --eval-prompts ...`` always searches with DDIM
    (``--steps``/``--eta`` are "DDIM steps/eta of the deployment sampler"; there is no ``--sampler``), so after
    loading the pipeline and writing ``--out`` it stops with "sampler 'ddim' cannot drive a flow-matching model ...
    use flow-euler", advice no ``tadq recipe`` flag can follow. The workload's ``sampler_for`` (the pipeline's own
    flow grid) is never reached. A user expects the search to run on the folder's own sampler (flow-euler, as
    ``tadq quantize``/``sample`` use for an FP folder) or to be given a ``--sampler`` flag."""
    out = tmp_path / "search"
    result, output = _invoke(_search(folders["sd3"], out, prompts, "--guidance-scale", 3))
    assert result.exit_code == 0, output
    assert _sampler(out)["kind"] == "flow-euler"


def test_recipe_on_flux_records_its_uniform_grid_and_distilled_guidance(folders, prompts, tmp_path):
    """``tadq recipe FLUX_FOLDER`` is refused as SD3 is (DDIM on a flow model). Once it runs, its ``recipe.json``
    should say how the winner was calibrated and must be deployed, as a ``tadq quantize`` of the folder does:
    FluxPipeline's uniform σ grid (``flow_sigmas="uniform"``) and the distilled guidance the calibration conditions
    embedded (``Deployment.distilled_guidance``, 3.5 by default). With the sampler forced to flow-euler the export
    records the grid but no distilled guidance (the search's recipes carry only ``guidance_scale``)."""
    out = tmp_path / "search"
    result, output = _invoke(_search(folders["flux"], out, prompts))
    assert result.exit_code == 0, output
    assert _sampler(out)["flow_sigmas"] == "uniform"
    assert _deployment(out).get("distilled_guidance") == 3.5


def test_recipe_export_of_a_pixart_folder_samples_with_tadq_sample(folders, prompts, tmp_path):
    """``tadq recipe PIXART_FOLDER ...`` runs and writes ``model/``, "its artefact", but as a bare denoiser
    (``save_quantized``): ``model_index.json`` says PixArtAlphaPipeline and lists only transformer and scheduler,
    no text encoder, tokenizer or VAE, so ``tadq sample OUT/model --prompt ...`` stops with "model_index.json lists no
    'vae', which a PixArtAlphaPipeline needs" (``tadq verify`` calls it OK). A user expects the exported artefact of
    a pipeline to be a pipeline artefact, as ``tadq quantize`` writes (``save_pipeline``), that samples prompts."""
    out = tmp_path / "search"
    result, output = _invoke(_search(folders["pixart"], out, prompts, "--guidance-scale", 3))
    assert result.exit_code == 0, output
    result, output = _invoke(["sample", out / "model", "--prompt", "a cat", "--num-samples", 1, "--out",
                              tmp_path / "samples", "--threads", 1])
    assert result.exit_code == 0, output
    assert (tmp_path / "samples" / "sample_0000.png").is_file()


def test_sample_sharded_refuses_a_pipeline_artefact_before_writing_anything(artefacts, tmp_path):
    """``tadq sample-sharded`` takes no prompts, so it cannot sample a text-to-image artefact; it finds out only
    after writing ``--out-dir/manifest.json`` and starting the first chunk, and says so in Python: "this
    SD3Transformer2DModel needs conditioning [...]: pass cond=Conditioning(...) (when sampling, conditions= a
    condition source)". A user expects a refusal before anything is written that names the command that samples
    prompts (``tadq sample ART --prompt ...``)."""
    out = tmp_path / "sharded"
    result, output = _invoke(["sample-sharded", artefacts["sd3"], "--num-samples", 2, "--batch-size", 2, "--out-dir",
                              out, "--device", "cpu", "--threads", 1])
    assert result.exit_code == 2, output
    assert "Conditioning(" not in output and "tadq sample" in output, output
    assert not (out / "manifest.json").exists(), "a manifest for a run that could never sample"


def test_sharded_run_key_tells_flux_grid_from_the_schedulers_grid(tmp_path):
    """``tadq.distributed``'s run key lists the sampler's kind, steps, eta, clip_sample, order and shift, but not the
    new ``flow_sigmas``: a sharded run on FluxPipeline's uniform σ grid resumed in the folder of a run on the
    scheduler's own grid reuses its chunks silently (the images of another sampler; a fresh uniform run differs by
    ~0.09 here). A user expects the resume to be refused as for any other sampler change (``StaleRunError``)."""
    from tadq.distributed.sampling import sample_sharded
    from tadq.distributed.store import StaleRunError
    from tadq.sampling import SamplerConfig

    model, scheduler = build_tiny_unet(), FlowMatchEulerDiscreteScheduler(shift=3.0)  # an unconditional flow model
    options = {"num_samples": 2, "seed": 1, "batch_size": 2, "chunk_size": 2, "progress": False}
    sample_sharded(model, scheduler, SamplerConfig("flow-euler", 2), out_dir=tmp_path / "run", **options)
    with pytest.raises(StaleRunError):
        sample_sharded(model, scheduler, SamplerConfig("flow-euler", 2, flow_sigmas="uniform"),
                       out_dir=tmp_path / "run", **options)


def test_sample_walks_an_fp_flow_folder_on_flow_euler_when_no_sampler_is_named(tmp_path):
    """``tadq quantize`` calibrates a flow-matching model folder on flow-euler when no sampler is named (DDIM cannot
    drive it), but ``tadq sample`` of the same FP folder took the presets' DDIM and refused it ("use flow-euler").
    A user expects both commands to pick the same sampler for the same folder."""
    from diffusers import DDPMPipeline

    from tadq.safefiles import load_checked

    folder = tmp_path / "flow-unet"
    DDPMPipeline(unet=build_tiny_unet(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)).save_pretrained(folder)
    tensors = tmp_path / "s.safetensors"
    result, output = _invoke(["sample", folder, "--num-samples", 2, "--steps", 2, "--out", tmp_path / "s.png",
                              "--tensor-out", tensors])
    assert result.exit_code == 0, output
    sampler = load_checked(tensors, "samples")[1]["sampler"]["data"]
    assert (sampler["kind"], sampler["num_steps"]) == ("flow-euler", 2)


@pytest.mark.parametrize("how", ["recipe-file", "set"])
def test_quantize_keeps_the_distilled_guidance_the_recipe_gives(artefacts, folders, tmp_path, how):
    """Flux: ``tadq quantize FLUX --recipe FLUX_ART/tadq_recipe.json`` (recorded distilled guidance 2.5) and ``tadq
    quantize FLUX --set deployments.0.distilled_guidance=2`` both calibrate at, and record, 3.5: the prompt encoder
    takes only ``--distilled-guidance`` (default 3.5) and its value overwrites the recipe's. A user reusing a recipe,
    or setting a recipe field, expects that value to be the one calibrated at and recorded (as
    ``--guidance-scale`` and the recipe's ``guidance_scale`` are)."""
    if how == "recipe-file":
        extra, expected = ["--recipe", artefacts["flux"] / "tadq_recipe.json"], FLUX_DISTILLED
    else:
        extra, expected = ["--sampler", "flow-euler", "--set", "deployments.0.distilled_guidance=2"], 2.0
    out = tmp_path / "art"
    args = ["quantize", folders["flux"], "--out", out, "--calib-trajectories", 2, "--calib-prompt", "a cat",
            "--cache-dir", tmp_path / "cache", "--threads", 1, *extra]
    result, output = _invoke(args)
    assert result.exit_code == 0, output
    assert _deployment(out)["distilled_guidance"] == expected


def test_quantize_refuses_a_distilled_guidance_set_on_sd3(folders, tmp_path):
    """``tadq quantize SD3 --distilled-guidance 2`` is refused ("not a FluxPipeline folder"), but ``--set
    deployments.0.distilled_guidance=2`` is accepted and written into the artefact's recipe; ``tadq verify`` calls
    the artefact OK and every ``tadq sample`` of it then fails ("distilled_guidance: a StableDiffusion3Pipeline
    embeds no guidance scale"). A user expects quantize to refuse the field before any work, as it refuses the
    flag, instead of writing an artefact that cannot be sampled."""
    out = tmp_path / "art"
    result, output = _invoke(_quantize(folders["sd3"], out, tmp_path, "--sampler", "flow-euler", "--set",
                                       "deployments.0.distilled_guidance=2"))
    assert result.exit_code == 2, output
    assert "distilled" in output, output
    assert not (out / "tadq_recipe.json").exists()


def test_quantize_takes_the_documented_flow_grid_override(folders, tmp_path):
    """docs/pipelines.md: "``--set sampler.flow_sigmas=uniform`` names the grid anywhere else". ``tadq quantize SD3
    --set sampler.flow_sigmas=uniform`` stops with "Recipe has no field 'sampler'", and no ``--set`` spelling
    works: each ``--set`` is validated alone, so ``deployments.0.sampler.flow_sigmas`` (or
    ``calibration.sampler.flow_sigmas``) is refused because the calibration and deployment samplers then differ,
    whichever is set first. A user expects the documented override to set both samplers' grid."""
    out = tmp_path / "art"
    result, output = _invoke(_quantize(folders["sd3"], out, tmp_path, "--sampler", "flow-euler", "--set",
                                       "sampler.flow_sigmas=uniform"))
    assert result.exit_code == 0, output
    assert _sampler(out)["flow_sigmas"] == "uniform" and _sampler(out, "calibration")["flow_sigmas"] == "uniform"


def test_quantize_recipe_takes_an_artefact_folder(artefacts, folders, tmp_path):
    """``tadq quantize FLUX --recipe FLUX_ART`` (the artefact folder, which holds its recipe as
    ``tadq_recipe.json``) is refused with "recipe FLUX_ART is a folder without a recipe.json; give the recipe's JSON
    file": ``load_recipe`` knows a search folder's ``recipe.json`` only. A user expects an artefact folder to give
    its recipe, or at least the message to name the file it holds."""
    result, output = _invoke(["quantize", folders["flux"], "--recipe", artefacts["flux"], "--out", tmp_path / "art",
                              "--calib-trajectories", 2, "--calib-prompt", "a cat", "--cache-dir", tmp_path / "cache",
                              "--threads", 1])
    assert result.exit_code == 0 or "tadq_recipe.json" in output, output


def test_sample_refuses_flux_guidance_without_a_negative_prompt_as_the_pipeline_call_does(folders, tmp_path):
    """``tadq sample FLUX --guidance-scale 2`` without ``--negative-prompt`` guided against the empty prompt, while
    ``tadq.load_pipeline(FLUX)(prompt, true_cfg_scale=2)`` refuses it (FluxPipeline would not guide at all without a
    negative prompt). The command refuses it too, with the call's message in its flag names, before loading; with
    ``--negative-prompt ''`` (the empty prompt, asked for) it samples."""
    import tadq

    out = tmp_path / "samples"
    args = ["sample", folders["flux"], "--prompt", "a cat", "--num-samples", 1, "--steps", 1, "--threads", 1,
            "--guidance-scale", 2, "--out", out]
    result, output = _invoke(args)
    assert result.exit_code == 2, output
    assert "--guidance-scale 2 without a --negative-prompt: FluxPipeline then samples without guidance" in output
    assert "--negative-prompt '' for the empty prompt" in output and "Loading" not in output and not out.exists()
    with pytest.raises(ValueError, match="true_cfg_scale=2 without a negative_prompt: FluxPipeline then samples "
                                         "without guidance"):
        tadq.load_pipeline(folders["flux"])("a cat", true_cfg_scale=2, num_inference_steps=1)
    result, output = _invoke([*args, "--negative-prompt", ""])
    assert result.exit_code == 0, output
    listing = json.loads((out / "prompts.json").read_text())
    assert listing["guidance_scale"] == 2 and listing["negative_prompt"] == ""


# --- pinned: right today, and worth keeping so ---------------------------------------------------------------------


def test_bench_sampler_names_round_trip_the_flux_grid():
    """Pins: the bench names of FluxPipeline's grid parse to ``flow_sigmas="uniform"`` (with a shift and a step
    count too) and ``sampler_name`` writes them back, so a bench report's regenerating command keeps the grid."""
    from tadq.experiments.bench.config import parse_sampler, sampler_name

    for name in ("flow-euler-uniform@2", "flow-euler-shift3-uniform@4"):
        sampler = parse_sampler(name)
        assert sampler.kind == "flow-euler" and sampler.flow_sigmas == "uniform"
        assert sampler_name(sampler, with_steps=True) == name and sampler.key.endswith("-uniform")
    assert parse_sampler("flow-euler@2").flow_sigmas is None
    with pytest.raises(ValueError, match="only flow-euler"):
        parse_sampler("ddim-eta0-uniform")


def test_sample_with_other_steps_keeps_a_flux_artefacts_grid_and_guidance(artefacts, tmp_path):
    """Pins: ``tadq sample FLUX_ART --sampler flow-euler --steps 3`` changes the step count only: the artefact's
    uniform σ grid and its recorded distilled guidance stay (prompts.json)."""
    out = tmp_path / "samples"
    result, output = _invoke(["sample", artefacts["flux"], "--sampler", "flow-euler", "--steps", 3, "--prompt",
                              "a cat", "--num-samples", 1, "--out", out, "--threads", 1])
    assert result.exit_code == 0, output
    settings = json.loads((out / "prompts.json").read_text())
    assert settings["sampler"]["data"]["num_steps"] == 3 and settings["sampler"]["data"]["flow_sigmas"] == "uniform"
    assert settings["distilled_guidance"] == FLUX_DISTILLED


def test_verify_checks_pipeline_artefacts_text_encoders_too(artefacts, tmp_path):
    """Pins: ``tadq verify`` passes the SD3 and Flux artefacts and, on a copy whose T5 weights were edited after
    saving, fails naming that file (the pipeline's components are in the manifest, not only the transformer)."""
    for which in ("sd3", "flux"):
        result, output = _invoke(["verify", artefacts[which]])
        assert result.exit_code == 0 and output.startswith("OK"), output
    copy = shutil.copytree(artefacts["sd3"], tmp_path / "copy")
    weights = copy / "text_encoder_3" / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    result, output = _invoke(["verify", copy])
    assert result.exit_code == 1 and "FAILED" in output and "text_encoder_3/model.safetensors" in output, output


@pytest.mark.slow
@needs_compiled_w8
def test_int8_compiled_backend_gives_the_fake_quant_latents_on_sd3(artefacts, tmp_path):
    """Pins: ``tadq sample SD3_ART --backend int8-compiled`` (integer kernels under torch.compile; the first step
    compiles, ~15 s on one thread) writes latents that agree with ``--backend fake``'s (PSNR ≥ 40 dB, the integer
    issue's agreement goal) and records the backend in the tensor file's settings."""
    from tadq.metrics.image import psnr_per_sample

    latents = {}
    for backend in ("fake", "int8-compiled"):
        tensors = tmp_path / f"{backend}.safetensors"
        result, output = _invoke(["sample", artefacts["sd3"], "--prompt", "a cat", "--num-samples", 1, "--steps", 1,
                                  "--backend", backend, "--out", tmp_path / backend, "--tensor-out", tensors,
                                  "--threads", 1])
        assert result.exit_code == 0, output
        latents[backend] = load_file(tensors)["latents"]
        with safe_open(tensors, "pt") as handle:
            assert json.loads(handle.metadata()["tadq"])["meta"]["backend"] == backend
    assert psnr_per_sample(latents["int8-compiled"], latents["fake"]).min() >= 40.0


@pytest.mark.parametrize("correction", ["ptqd", "tac", "tcec"])
def test_corrections_fit_on_flow_euler_and_hold_the_artefact_to_its_grid(folders, tmp_path, correction):
    """Pins (docs/sampling.md, "Corrections on each sampler": PTQD on v, TAC and TCEC on flow-euler): ``tadq quantize
    SD3 --correct C`` fits C for ``flow-euler-2``, and ``tadq sample`` of the artefact at another step count is
    refused in one line naming the grid the tables were fitted for."""
    out = tmp_path / "art"
    result, output = _invoke(_quantize(folders["sd3"], out, tmp_path, "--sampler", "flow-euler", "--correct",
                                       correction, "--set", "corrections.0.num_samples=2"))
    assert result.exit_code == 0, output
    assert _recipe_json(out)["corrections"], "no correction recorded"
    result, output = _invoke(["sample", out, "--prompt", "a cat", "--num-samples", 1, "--steps", 3, "--out",
                              tmp_path / "samples", "--threads", 1])
    assert result.exit_code == 2 and "fitted for flow-euler-2" in output, output


def test_run_on_pixart_with_dpmsolver_and_corrections(folders, prompts, tmp_path):
    """Pins: ``tadq run --model PIXART --sampler dpmsolver++ --steps 2`` with PTQD and TAC rows samples FP and every
    row on DPM-Solver++ 2M (the folder's own scheduler) at the given guidance, and reports them."""
    out = tmp_path / "run"
    result, output = _invoke(["run", "--model", folders["pixart"], "--sampler", "dpmsolver++", "--steps", 2,
                              "--presets", "W8A8", "--methods", "naive,ptqd,tac", "--num-samples", 2,
                              "--calib-trajectories", 2, "--batch-size", 2, "--guidance-scale", 3,
                              "--calib-prompts", prompts["calib"], "--eval-prompts", prompts["eval"],
                              "--cache-dir", tmp_path / "cache", "--out", out, "--threads", 1])
    assert result.exit_code == 0, output
    report = json.loads((out / "results.json").read_text())
    assert report["config"]["sampler"]["data"]["kind"] == "dpmsolver++"
    assert report["config"]["workload"]["guidance_scale"] == 3.0
    methods = [row["method"] for row in report["rows"]]
    assert methods[0] == "FP" and any("PTQD" in m for m in methods) and any("TAC" in m for m in methods), methods


def test_run_takes_flux_distilled_guidance_and_refuses_it_elsewhere(folders, prompts, tmp_path):
    """``tadq run --distilled-guidance G`` on a Flux folder calibrates and evaluates with the model embedding G (a
    model input, so it keys the cells); on SD3 the flag is refused before any work."""
    from tadq.experiments.workload import load_workload

    workload = load_workload(str(folders["flux"]), calibration_prompts=CALIB_PROMPTS,
                             evaluation_prompts=EVAL_PROMPTS, distilled_guidance=2.0)
    assert workload.distilled_guidance == 2.0 and workload.settings["distilled_guidance"] == 2.0
    assert workload.calibration_conditions(0, [0]).added_cond_kwargs["guidance"].tolist() == [2.0]
    common = ["--sampler", "flow-euler", "--steps", 1, "--presets", "W8A8", "--methods", "naive", "--num-samples", 2,
              "--calib-trajectories", 2, "--batch-size", 2, "--calib-prompts", prompts["calib"], "--eval-prompts",
              prompts["eval"], "--cache-dir", tmp_path / "cache", "--threads", 1, "--distilled-guidance", 2]
    result, output = _invoke(["run", "--model", folders["flux"], "--out", tmp_path / "flux", *common])
    assert result.exit_code == 0, output
    result, output = _invoke(["run", "--model", folders["sd3"], "--out", tmp_path / "sd3", *common])
    assert result.exit_code == 2 and "not a FluxPipeline folder" in output and not (tmp_path / "sd3").exists()
