import subprocess
import sys

from typer.testing import CliRunner

from tadq.cli.app import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "run" in result.output and "zoo" in result.output


# left to the commands that use them: torch, diffusers (transformers, scipy under it), plotting, the feature-space
# metrics, the harness and the model zoo cost seconds to import, which `import tadq` and `tadq --help` would pay for
# nothing (tests/test_lazy_imports.py: also `tadq COMMAND --help` and a flag the parser refuses)
LAZY_AT_START = ("torch", "diffusers", "transformers", "scipy", "matplotlib", "sklearn", "skimage", "torchmetrics",
                 "tadq.experiments", "tadq.report", "tadq.search", "tadq.metrics", "tadq.zoo")


def _importers(lines: list[str]) -> list[tuple[str, str | None]]:
    """(module, the module whose import imported it, None at top level) from ``-X importtime`` lines, which list a
    module after the ones it imported, indented two spaces deeper. What tadq's own modules import counts against
    its start; what a dependency imports does not (transformers 5.0 imports scikit-learn when it is installed)."""
    entries = [(len(text) - len(text.lstrip()), text.strip())
               for text in (line.rpartition("|")[2] for line in lines if line.startswith("import time:"))][1:]
    found = []
    for i, (depth, name) in enumerate(entries):
        parent = next((other for level, other in entries[i + 1:] if level < depth), None)
        found.append((name, parent))
    return found


def test_python_dash_m_tadq_runs_the_same_commands():
    """``python -m tadq`` works where the ``tadq`` script is not on PATH (a venv not activated), and its start
    (``import tadq`` and the CLI) imports none of ``LAZY_AT_START`` and prints no warnings."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "tadq", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "quantize" in done.stdout and "sample" in done.stdout
    lines = done.stderr.splitlines()
    imported = {line.rpartition("|")[2].strip() for line in lines if line.startswith("import time:")}
    assert {"tadq", "tadq.cli.app", "typer"} <= imported  # the -X importtime listing was read
    eager = sorted({lazy for lazy in LAZY_AT_START for name, importer in _importers(lines)
                    if f"{name}.".startswith(f"{lazy}.") and (importer or "tadq").split(".")[0] == "tadq"})
    assert not eager, f"imported at start: {eager}"
    stray = [line for line in lines if not line.startswith("import time:")]
    assert not stray, "tadq --help printed warnings:\n" + "\n".join(stray)


def test_help_in_an_80_column_terminal_keeps_every_flag_name_whole():
    """Rich's boxed help cut "--calib-trajectories" to "--calib-traject…" at 80 columns; the plain help wraps."""
    cases = ((["quantize"], ["--calib-trajectories", "--recon-activation-iters", "--quantize-attention"]),
             (["zoo", "train"], ["--overwrite", "--force-foreign"]))
    for command, flags in cases:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0
        assert all(flag in result.output for flag in flags), result.output
        assert max(len(line) for line in result.output.splitlines()) <= 80


def test_unknown_preset_is_a_clean_error(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "--presets", "W3A9", "--out", str(out)])
    assert result.exit_code == 2
    assert "unknown preset" in result.output
    assert not out.exists()


def test_missing_model_is_a_clean_error(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "--model", str(tmp_path / "nope"), "--out", str(out)])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert not out.exists()


def test_not_a_diffusers_folder_is_a_clean_error(tmp_path):
    (tmp_path / "m").mkdir()
    result = runner.invoke(app, ["run", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "not a diffusers model folder" in result.output


def test_run_on_a_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "report"
    result = runner.invoke(app, [
        "run", "--model", str(tiny_model_dir), "--presets", "W8A8", "--methods", "naive", "--num-samples", "4",
        "--steps", "4",
        "--calib-trajectories", "4", "--batch-size", "4", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
    ])
    assert result.exit_code == 0, result.output
    assert "W8A8" in result.output and (out / "results.json").exists()
