"""``import tadq`` and the command line's help and usage errors import no diffusers; every registry lookup still sees
every built-in registration, whatever was imported before it.

Each check runs in a fresh interpreter: in the test process every module is long imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# what made `tadq --help` take seconds: diffusers (and transformers, scipy.stats, torch._dynamo under it), and torch
HEAVY = ("diffusers", "transformers", "scipy", "torch._dynamo", "torch")

# the command line as `python -m tadq ARGS` runs it, then the heavy modules that were imported, as JSON
RUN_CLI = """
import json, runpy, sys
heavy = json.loads(sys.argv[2])
sys.argv = ["tadq", *json.loads(sys.argv[1])]
try:
    runpy.run_module("tadq", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    code = exit_.code
else:
    code = 0
print(json.dumps({"code": code, "heavy": [m for m in heavy if m in sys.modules]}))
"""


def _python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "PATH": "", "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cli(*args: str) -> dict:
    out = _python(RUN_CLI, json.dumps(list(args)), json.dumps(HEAVY))
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["quantize", "--help"], ["sample", "--help"], ["run", "--help"],
                                  ["zoo", "--help"]])
def test_help_imports_neither_diffusers_nor_torch(args):
    ran = _cli(*args)
    assert ran == {"code": 0, "heavy": []}


@pytest.mark.parametrize("args", [["quantize", "--steps", "abc"], ["sample", "--no-such-flag"], ["verify"],
                                  ["no-such-command"]])
def test_a_refused_command_line_imports_neither_diffusers_nor_torch(args):
    ran = _cli(*args)
    assert ran == {"code": 2, "heavy": []}


def test_import_tadq_imports_no_diffusers_and_has_every_public_name():
    out = _python("import sys, tadq\n"
                  "print(sorted(m for m in ('diffusers', 'transformers', 'scipy') if m in sys.modules))\n"
                  "print(all(hasattr(tadq, name) for name in tadq.__all__), set(tadq.__all__) <= set(dir(tadq)))\n"
                  "print(tadq.quantize.__module__, tadq.QuantConfig.__module__, tadq.TFMQMethod.__module__)\n"
                  "print(tadq.adapters.UNet2DAdapter.__name__)\n")
    assert out.splitlines() == ["[]", "True True", "tadq.api tadq.config tadq.tfmq.method", "UNet2DAdapter"]


# every table a built-in module registers in, as {table: sorted names}
TABLES = """
import json
from tadq import registry
from tadq.recipe import registered_quant_methods
print(json.dumps({
    "families": sorted(registry.registered_families()),
    "adapters": sorted(f"{k.__name__}:{v.__name__}" for k, v in registry.registered_adapters().items()),
    "corrections": sorted(f"{k.__name__}:{v.__name__}" for k, v in registry.registered_corrections().items()),
    "configs": sorted(registry.registered_config_types()),
    "methods": sorted(k.__name__ for k in registered_quant_methods()),
}))
"""
# what `import tadq` imported before its names were lazy, imported explicitly
EAGER = ("import tadq.adapters, tadq.corrections, tadq.tfmq, tadq.api, tadq.config, tadq.denoiser, tadq.pipelines, "
         "tadq.quant.qscheme, tadq.recipe, tadq.sampling\n")


def test_a_first_lookup_sees_every_built_in_registration():
    lazy = json.loads(_python(TABLES))
    eager = json.loads(_python(EAGER + TABLES))
    assert lazy == eager
    assert set(lazy["families"]) == {"UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel",
                                      "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel"}
    assert {"PTQDConfig:PTQDCorrection", "TACConfig:TACCorrection", "TCECConfig:TCECCorrection",
            "TFMQConfig:TFMQCorrection"} <= set(lazy["corrections"])
    assert {"NaiveMethod", "QDiffusionMethod", "SVDQuantMethod", "TFMQMethod"} <= set(lazy["methods"])


def test_adapter_for_finds_a_built_in_adapter_with_nothing_else_imported():
    out = _python("from diffusers import UNet2DModel\n"
                  "from tadq.registry import adapter_for\n"
                  "model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,\n"
                  "                    block_out_channels=(4, 8), norm_num_groups=4,\n"
                  "                    down_block_types=('DownBlock2D', 'DownBlock2D'),\n"
                  "                    up_block_types=('UpBlock2D', 'UpBlock2D'))\n"
                  "print(type(adapter_for(model)).__name__)\n")
    assert out.strip() == "UNet2DAdapter"


def test_a_recipe_file_loads_in_a_process_that_imported_only_tadq_recipe(tmp_path):
    """A recipe names its method and correction configs by type: TFMQ's and TAC's are registered by modules that
    ``tadq.recipe`` does not import."""
    from tadq.recipe import Recipe, save_recipe
    from tadq.recipe_presets import correction_configs
    from tadq.tfmq import TFMQMethod

    recipe = Recipe.from_preset("W8A8", method=TFMQMethod(), corrections=correction_configs(("tac",), 0))
    path = tmp_path / "recipe.json"
    save_recipe(recipe, path)
    out = _python("from tadq.recipe import load_recipe\n"
                  f"recipe = load_recipe({str(path)!r})\n"
                  "print(type(recipe.method).__name__, [type(c).__name__ for c in recipe.corrections])\n")
    assert out.strip() == "TFMQMethod ['TACConfig']"


# a bad flag that needs no model, and the start of the one-line refusal: given before torch is imported
REFUSED_FLAGS = [
    (["sample", "x", "--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["sample", "/nonexistent-tadq-folder"], "model folder /nonexistent-tadq-folder does not exist"),
    (["sample", "x", "--seed", "-1"], "--seed must be an int in [0, 2**32 - 1]"),
    (["sample", "x", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["sample", "x", "--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0"),
    (["sample", "x", "--class-label", "-2"], "--class-label -2: a class label is an index >= 0"),
    (["sample", "x", "--prompts", "/nonexistent-tadq-prompts"], "--prompts /nonexistent-tadq-prompts does not exist"),
    (["evaluate", "x", "--num-samples", "-1"], "--num-samples must be >= 1, got -1"),
    (["evaluate", "x", "--features", "digit"], "--features digit is neither one of"),
    (["evaluate", "x", "--reference", "/nonexistent-tadq-folder"], "--reference /nonexistent-tadq-folder is not a"),
    (["analyze", "x", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["run", "--presets", "W9"], "unknown preset 'W9'"),
    (["run", "--num-samples", "1"], "--num-samples must be >= 2, got 1"),
    (["run", "--seed", "3", "--calib-seed", "3"], "--calib-seed must differ from --seed"),
    (["run", "--fp-layers", "firstlast"], "firstlast"),
    (["run", "--recon-iters", "-2"], "--recon-iters must be >= 0, or -1 for the default; got -2"),
    (["bench", "--seed", "-5"], "--seed must be an int in [0, 2**32 - 1]"),
    (["quantize", "--out", "q", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["quantize", "--out", "q", "--calib-seed", "-1"], "--calib-seed must be an int in [0, 2**32 - 1]"),
    (["recipe", "--out", "r", "--budget-bits", "W8A8", "--heldout", "0"], "--heldout must be >= 1, got 0"),
    (["sample-sharded", "--chunk-size", "-1"], "--chunk-size must be >= 0 (0: the batch size), got -1"),
    (["verify", "/nonexistent-tadq-folder"], "/nonexistent-tadq-folder does not exist"),
    # row names, bench's sample count, budgets, quantize's flag conflicts, dtype names, eta and the training configs
    (["run", "--methods", "naive,nosuch"], "unknown methods ['nosuch']; choose from ['best', 'naive',"),
    (["bench", "--num-samples", "1"], "--num-samples must be >= 2, got 1"),
    (["bench", "--methods", "nosuch"], "unknown methods ['nosuch']; choose from ['best', 'naive',"),
    (["recipe", "--out", "r", "--budget-gbitops", "nan"], "--budget-gbitops must be a finite number > 0, got nan"),
    (["recipe", "--out", "r"], "give exactly one budget: --budget-gbitops X"),
    (["recipe", "--out", "r", "--budget-bits", "W9"], "--budget-bits: unknown preset 'W9'"),
    (["quantize", "--out", "q", "--preset", "W9"], "unknown preset 'W9'"),
    (["quantize", "--out", "q", "--method", "nosuch"], "--method must be one of ['naive', 'qdiffusion', 'tfmq']"),
    (["quantize", "--out", "q", "--recipe", "a.json", "--config", "b.json"], "give --recipe or --config, not both"),
    (["quantize", "--out", "q", "--fp-layers", "none", "--keep-fp-role", "conv_in"],
     "give --fp-layers or --keep-fp-role, not both"),
    (["quantize", "--out", "q", "--set", "noequals"], "--set 'noequals': write FIELD.PATH=VALUE"),
    *[([*command, "--dtype", "float64"], "--device/--dtype: dtype 'float64' is not supported")
      for command in (["sample", "x"], ["evaluate", "x"], ["analyze", "x"], ["quantize", "--out", "q"], ["run"],
                      ["bench"])],
    *[([*command, "--eta", "2"], "SamplerConfig.eta must lie in [0, 1] (0 = deterministic DDIM), got 2.0.")
      for command in (["sample", "x"], ["evaluate", "x"], ["analyze", "x"], ["quantize", "--out", "q"], ["run"],
                      ["recipe", "--out", "r", "--budget-bits", "W8A8"], ["sample-sharded"])],
    (["run", "--sampler", "ddpm", "--eta", "0.5"], "SamplerConfig.eta=0.5 only applies to kind='ddim'"),
    (["zoo", "train", "--out", "z", "--resolution", "12"], "resolution must be one of (8, 16, 32), got 12"),
    (["zoo", "train-classifier", "--out", "z", "--epochs", "0"], "epochs must be >= 1, got 0"),
    (["zoo", "train-photos", "--out", "z", "--label-dropout", "1.5"], "label_dropout must be in (0, 1), got 1.5"),
    (["zoo", "train-photo-classifier", "--out", "z", "--epochs", "0"], "epochs must be >= 1 and batch_size >= 2"),
    (["zoo", "train-t2i", "--out", "z", "--prompt-dropout", "0"], "prompt_dropout must be in (0, 1), got 0.0"),
    (["zoo", "train-dit", "--out", "z", "--steps", "0"], "steps must be >= 1, got 0"),
]


@pytest.mark.parametrize(("args", "message"), REFUSED_FLAGS, ids=[" ".join(a) for a, _ in REFUSED_FLAGS])
def test_a_flag_refused_without_a_model_is_refused_before_torch_is_imported(args, message, tmp_path):
    """A typo cost the seconds of importing torch and diffusers (6 to 9) before its one-line error: every check
    that needs no model now runs first, with the message and exit code it had."""
    (tmp_path / "x").mkdir()  # the model folder the commands are given: there, so the flag is what is refused
    done = subprocess.run([sys.executable, "-c", RUN_CLI, json.dumps(args), json.dumps(HEAVY)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={"PYTHONPATH": str(SRC), "PATH": "", "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    ran = json.loads(done.stdout.strip().splitlines()[-1])
    assert ran["code"] == 2, done.stderr
    assert message in " ".join(done.stderr.split()), done.stderr
    assert ran["heavy"] == [], done.stderr


def test_the_preset_names_checked_without_torch_are_the_preset_table():
    from tadq.names import PRESET_NAMES
    from tadq.quant.qscheme import PRESETS

    assert PRESET_NAMES == {name: weights.enabled for name, (weights, _) in PRESETS.items()}


def test_the_rows_checked_without_torch_are_the_registered_rows():
    """``--methods`` is checked against ``BUILT_IN_ROWS`` before the registry is imported: the two name the same
    rows in the same order (the refusal lists them), in a process that registered nothing of its own."""
    out = _python("from tadq.experiments.rows import method_names\n"
                  "from tadq.experiments.run_checks import BUILT_IN_ROWS\n"
                  "print(method_names() == BUILT_IN_ROWS)\n")
    assert out.strip() == "True"


def test_the_dtype_names_checked_without_torch_are_the_dtype_table():
    from tadq.device import DTYPES
    from tadq.names import DTYPE_NAMES

    assert DTYPE_NAMES == tuple(DTYPES)


def test_the_bench_sample_counts_checked_without_torch_are_the_matrices():
    from tadq.experiments.bench import matrix
    from tadq.experiments.run_checks import BENCH_SAMPLES

    assert BENCH_SAMPLES == {name: matrix(name)["num_samples"] for name in ("default", "quick")}
