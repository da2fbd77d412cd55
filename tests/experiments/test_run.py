import json

import pytest
import torch

import tadq.experiments.rows.base as run_module
from tadq.config import CalibrationConfig
from tadq.experiments.run import RunConfig, load_cell, run_main_job
from tadq.sampling import SamplerConfig

SAMPLER = SamplerConfig(kind="ddim", num_steps=6)


def _config(model_dir, out, **kw) -> RunConfig:
    base = dict(model=str(model_dir), presets=("W8A8", "W4A4"), methods=("naive",), num_samples=8, sampler=SAMPLER,
                eval_seed=1,
                calibration=CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=3,
                                              samples_per_step=8, seed=0, batch_size=8),
                batch_size=8, out_dir=str(out), cache_dir=str(out / "cache"), grid_samples=8)
    base.update(kw)
    return RunConfig(**base)


def test_main_job_writes_a_complete_report(tmp_path, tiny_model_dir):
    results = run_main_job(_config(tiny_model_dir, tmp_path / "report"))
    rows = {row["bits"]: row for row in results["rows"]}
    assert set(rows) == {"W32A32", "W8A8", "W4A4"}
    assert rows["W32A32"]["final_mse"] == 0.0 and rows["W32A32"]["psnr"] is None
    # a user's model is not the shipped digits model: no digit-classifier metrics are made up for it
    assert all(row["fd_digits"] is None and row["agreement"] is None for row in rows.values())
    assert rows["W8A8"]["final_mse"] < rows["W4A4"]["final_mse"]
    assert rows["W8A8"]["psnr"] > rows["W4A4"]["psnr"]
    for name in ("results.json", "results.md", "samples.png", "per_step_error.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert len(saved["per_step_mse"]["naive PTQ W4A4"]) == SAMPLER.num_steps + 1
    assert saved["fd_digits_real_vs_real"] is None and "not computed" in saved["notes"]["fd"]


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, tiny_model_dir, monkeypatch):
    reference = run_main_job(_config(tiny_model_dir, tmp_path / "a"))
    real_quantize = run_module.quantize
    calls = []

    def interrupted(model, scheduler, config, **kw):
        calls.append(config.label)
        if config.label == "W4A4":
            raise KeyboardInterrupt
        return real_quantize(model, scheduler, config, **kw)

    monkeypatch.setattr(run_module, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_main_job(_config(tiny_model_dir, tmp_path / "b"))
    assert len(list((tmp_path / "b" / "cells").glob("*.safetensors"))) == 2  # FP and W8A8 finished and kept
    counted = []
    monkeypatch.setattr(run_module, "quantize", lambda *a, **k: counted.append(1) or real_quantize(*a, **k))
    resumed = run_main_job(_config(tiny_model_dir, tmp_path / "b"))
    assert len(counted) == 1  # only the unfinished W4A4 cell was computed again
    for ref_row, row in zip(reference["rows"], resumed["rows"], strict=True):
        for key in ("fd_digits", "agreement", "psnr", "ssim", "final_mse"):
            assert ref_row[key] == row[key]


def test_qdiffusion_and_ptqd_rows_run_end_to_end(tmp_path, tiny_model_dir):
    from tadq.config import ReconstructionConfig

    config = _config(tiny_model_dir, tmp_path / "q", presets=("W4A8",), methods=("naive", "qdiffusion", "ptqd"),
                     reconstruction=ReconstructionConfig(weight_iters=40, activation_iters=20, batch_size=8))
    results = run_main_job(config)
    rows = {row["method"]: row for row in results["rows"]}
    assert set(rows) == {"FP", "naive PTQ", "Q-Diffusion", "Q-Diffusion + PTQD"}
    assert rows["Q-Diffusion"]["final_mse"] > 0
    tables = results["extras"]["Q-Diffusion + PTQD W4A8"]["ptqd_tables"]
    assert len(tables["k"]) == SAMPLER.num_steps
    assert (tmp_path / "q" / "ptqd_tables.png").exists()
    assert len(list((tmp_path / "q" / "models").glob("qdiffusion-W4A8-*"))) == 1  # PTQD reused the base row's model


def test_same_seed_same_numbers_and_disjoint_seeds_enforced(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="differ"):
        _config(tiny_model_dir, tmp_path, eval_seed=0)
    with pytest.raises(ValueError, match="preset"):
        _config(tiny_model_dir, tmp_path, presets=("W3A3",))
    with pytest.raises(ValueError, match="methods"):
        _config(tiny_model_dir, tmp_path, methods=("magic",))


def test_bad_model_path_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        run_main_job(_config(tmp_path / "missing", out))
    assert not out.exists()


def test_cells_are_bit_identical_across_runs(tmp_path, tiny_model_dir):
    first = run_main_job(_config(tiny_model_dir, tmp_path / "x", presets=("W4A8",)))
    second = run_main_job(_config(tiny_model_dir, tmp_path / "y", presets=("W4A8",)))
    cells = [sorted((tmp_path / d / "cells").glob("*.safetensors")) for d in ("x", "y")]
    assert cells[0]
    for a, b in zip(*cells, strict=True):
        assert torch.equal(load_cell(a)["images"], load_cell(b)["images"])
    assert first["rows"][1]["psnr"] == second["rows"][1]["psnr"]


# ≈ 14 s on a 2-core AVX2 CPU (six W4A4 rows): `make test-slow`; the default suite runs the Q-Diffusion and PTQD
# rows end to end (above) and fits every TAC / TCEC stack on every sampler (tests/corrections)
@pytest.mark.slow
def test_tac_and_tcec_rows_run_end_to_end(tmp_path, tiny_model_dir):
    from tadq.config import ReconstructionConfig

    methods = ("qdiffusion", "ibc", "ner", "tac", "tcec", "tac+tcec")
    config = _config(tiny_model_dir, tmp_path / "t", presets=("W4A4",), methods=methods,
                     reconstruction=ReconstructionConfig(weight_iters=2, activation_iters=2, batch_size=8))
    results = run_main_job(config)
    rows = {row["method"]: row for row in results["rows"]}
    assert {"Q-Diffusion + TAC", "Q-Diffusion + TCEC", "Q-Diffusion + TAC + TCEC"} <= set(rows)
    assert len({rows[m]["final_mse"] for m in rows if m != "FP"}) == len(methods)  # every row really differs
    stacked = results["extras"]["Q-Diffusion + TAC + TCEC W4A4"]["correction_tables"]
    assert set(stacked) == {"0:TAC", "1:TCEC"} and len(stacked["1:TCEC"]["k"]) == SAMPLER.num_steps
    assert (tmp_path / "t" / "correction_tables.png").exists()
    assert len(list((tmp_path / "t" / "models").glob("qdiffusion-W4A4-*"))) == 1  # all rows share one base model


def test_fp_layers_reach_every_tadq_row_and_the_report(tmp_path, tiny_model_dir):
    from tadq.experiments.rows import recipes_for_row

    config = _config(tiny_model_dir, tmp_path / "fl", presets=("W8A8",), fp_layers="first_last")
    for row in ("naive", "qdiffusion", "tac", "svdquant"):
        assert recipes_for_row(row, "W8A8", config).keep_fp_roles == ("input_conv", "output_conv")
    assert recipes_for_row("naive", "W8A8", _config(tiny_model_dir, tmp_path, fp_layers="none")).keep_fp_roles == ()
    kept = run_main_job(config)
    quantized_all = run_main_job(_config(tiny_model_dir, tmp_path / "none", presets=("W8A8",), fp_layers="none"))
    # the input and output convs leave the quantized path: the samples change, and the report says why
    assert kept["rows"][1]["final_mse"] != quantized_all["rows"][1]["final_mse"]
    assert "input_conv, output_conv" in kept["notes"]["fp_layers"]
    assert "none" in quantized_all["notes"]["fp_layers"]
    assert "input_conv, output_conv" in (tmp_path / "fl" / "results.md").read_text()


def test_fp_layers_refused_when_unknown(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="unknown fp_layers 'last'"):
        _config(tiny_model_dir, tmp_path, fp_layers="last")
    # peers keep the same layers in float (tests/experiments/peers: test_peer_rows_keep_the_runs_fp_layers)
    _config(tiny_model_dir, tmp_path, methods=("naive", "quanto"), fp_layers="first_last")


def test_results_note_lists_what_each_peer_row_quantized():
    """A peer's setting name can promise more than it quantizes: results.md carries each peer row's measured
    coverage, and nothing when no peer row ran."""
    from tadq.experiments.run import _peer_coverage_note

    cells = [{"extras": {}}, {"extras": {"peer": {"summary": "quanto 0.2.7: inputs quantized in 29"}}}]
    note = _peer_coverage_note(["naive PTQ W8A8", "optimum-quanto W8A8"], cells)
    assert note.splitlines() == ["Peer coverage (measured):",
                                 "- optimum-quanto W8A8: quanto 0.2.7: inputs quantized in 29"]
    assert _peer_coverage_note(["naive PTQ W8A8"], cells[:1]) == ""


def test_results_note_names_the_gptq_targets_ridge_damping():
    """Two GPTQ runs that differ only in the target's damping give different numbers: the note tells them apart."""
    from tadq.config import ReconstructionConfig
    from tadq.experiments.run import _reconstruction_note

    assert "target ridge damping 0.0001" in _reconstruction_note(ReconstructionConfig(gptq_target_damp=1e-4))
    assert "target ridge damping 0.01" in _reconstruction_note(ReconstructionConfig(gptq_target_damp=None))
    assert "ridge" not in _reconstruction_note(ReconstructionConfig(gptq_target="own_inputs"))
    assert "toward W" in _reconstruction_note(ReconstructionConfig())
    assert "toward zero" in _reconstruction_note(ReconstructionConfig(gptq_target_prior="zero"))


def test_evaluation_prompts_beyond_the_samples_are_refused():
    """``tadq run --eval-prompts`` with 4 prompts and --num-samples 2 evaluated 2 of them without a word; tadq sample
    refuses the same thing."""
    with pytest.raises(ValueError, match="num_samples 2 for 4 evaluation prompts: .*'c'"):
        RunConfig(num_samples=2, evaluation_prompts=("a", "b", "c", "d"), calibration_prompts=("e",))
    assert RunConfig(num_samples=4, evaluation_prompts=("a", "b", "c", "d"), calibration_prompts=("e",))


@pytest.mark.parametrize("fields, needle", [
    ({"num_samples": 1}, "num_samples must be >= 2, got 1"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"eval_seed": 0}, "calibration.seed must differ from eval_seed"),
    ({"num_samples": 2, "evaluation_prompts": ("a", "b", "c"), "calibration_prompts": ("e",)},
     "give num_samples 3 or more"),
])
def test_run_config_names_its_own_fields_not_the_cli_flags(fields, needle):
    """From Python the checks name RunConfig's fields (``tadq run`` names its flags, tests/cli/test_shared_flags.py);
    the prompt-count message told a library caller to "give --num-samples"."""
    with pytest.raises(ValueError) as error:
        RunConfig(**fields)
    assert needle in str(error.value) and "--" not in str(error.value)


def test_preset_names_are_stored_as_the_preset_table_spells_them():
    """A preset name in another case or with blanks passed the check of ``RunConfig`` and ``BenchConfig`` and was
    stored as given, so the rows, files and measured best rows keyed by the name did not find it."""
    from tadq.experiments.bench.config import BenchConfig

    assert RunConfig(presets=(" w4a8", "W8A8")).presets == ("W4A8", "W8A8")
    assert BenchConfig(methods=("naive",), presets=("w4a4\n",)).presets == ("W4A4",)


def test_an_eval_seed_a_row_chose_its_settings_on_is_refused(tmp_path):
    """TCEC chooses (a, κ) on held-out seed calibration seed + 100000: `tadq run --seed 100000` scored the TCEC row
    on the very noise its choice was made on; only calibration.seed == eval_seed was refused."""
    config = dict(model="digits", presets=("W8A8",), methods=("naive", "tcec"), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"eval_seed 100000 is the corrections\[0\]'s held-out selection seed "
                                         r"\(TCECConfig\) of row tcec at W8A8"):
        RunConfig(eval_seed=100_000, **config)
    assert RunConfig(eval_seed=100_001, **config)  # apart from every seed the rows fit or choose on
    assert RunConfig(eval_seed=100_000, **(config | {"methods": ("naive", "ptqd")}))  # PTQD alone chooses nothing


def test_a_rerun_with_another_seed_names_its_own_cells_for_readers_of_the_folder(tmp_path, tiny_model_dir):
    """results.json lists its cells' keys: the first run's cells stay in cells/ (reused when its settings come
    back), and ``tfmq_measure paired`` read both runs' cells as one."""
    from tadq.experiments.tfmq_measure import paired_psnr, report_cells

    out = tmp_path / "same"
    run_main_job(_config(tiny_model_dir, out, presets=("W4A4",), eval_seed=1, num_samples=2))
    second = run_main_job(_config(tiny_model_dir, out, presets=("W4A4",), eval_seed=2, num_samples=2))
    assert len(list((out / "cells").glob("*.safetensors"))) == 4
    saved = json.loads((out / "results.json").read_text())
    cells = report_cells(str(out))
    assert sorted(cell["key"] for cell in cells) == sorted(saved["cell_keys"]) and len(cells) == 2
    paired = paired_psnr(str(out), "naive PTQ")
    eps = torch.finfo(torch.float32).eps
    assert paired["naive PTQ"]["psnr"] == pytest.approx(second["rows"][1]["psnr"], rel=4 * eps)


def test_each_row_is_built_and_shown_once_however_often_it_is_named():
    """``--presets W8A8,w8a8 --methods naive,naive`` showed one cell four times; ``--methods tac,best`` at W8A8 (best
    is tac there) twice, in the table and every figure."""
    from tadq.experiments.run import job_rows

    assert job_rows(RunConfig(presets=("W8A8", "w8a8"), methods=("naive", "naive"))) == [("naive", "W8A8")]
    assert job_rows(RunConfig(presets=("W4A8", "W4A4"), methods=("tac", "best"))) == [
        ("tac", "W4A8"), ("tac", "W4A4"), ("svdquant+tac", "W4A4")]


def test_the_bench_measures_a_row_named_twice_through_best_once():
    from tadq.experiments.bench import BenchConfig
    from tadq.experiments.bench.runner import _variants

    bench = BenchConfig(methods=("tac", "best"), presets=("W4A8", "W4A4"), samplers=(SAMPLER,))
    entries = _variants(bench.run_config(SAMPLER), None)
    assert [(method, preset) for method, preset, _ in entries] == [
        ("fp", "W32A32"), ("tac", "W4A8"), ("tac", "W4A4"), ("best", "W4A4")]
    assert entries[-1][2].name == "SVDQuant + TAC"


def test_the_fd_note_says_when_the_sample_count_leaves_the_covariance_rank_deficient():
    """``tadq run --num-samples 2`` printed FD-digits as a plain number from a rank-1 covariance (128 features)."""
    from tadq.experiments.run import _fd_note
    from tadq.metrics.features import DigitsFeatureSpace

    space = DigitsFeatureSpace(16)
    assert "rank at most 1 < 128" in _fd_note(space, 2)
    assert "rank" not in _fd_note(space, 256) and "256 samples" in _fd_note(space, 256)
