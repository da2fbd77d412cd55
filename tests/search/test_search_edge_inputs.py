"""Red-team inputs of ``tadq recipe`` and of the SVDQuant pieces it searches: duplicate and string axes of the space,
bad counts, tie margins and non-finite budgets, a byte budget no candidate fits, a stale model sidecar after an
interrupted rebuild, a model folder deleted from the cache, an edited or damaged candidate record, an interrupted
SVDQuant search against an uninterrupted one, mixed-precision budgets, bits and sensitivities no plan can have,
low-rank ranks beyond a layer's dims, layer inputs recorded in groups, rotation of channel counts that are no power
of two, and the cached Hadamard matrix. Each refusal is checked to come before any work (no folder written, no
sampling). Tiny model, tiny settings."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
from tests.conftest import build_tiny_unet
from tests.search.tiny_search import SAMPLER, tiny_scheduler, tiny_space
from typer.testing import CliRunner

from tadq import api
from tadq.cli.app import app
from tadq.config import CalibrationConfig
from tadq.quant import QScheme
from tadq.quant.lowrank import effective_rank, lowrank_split
from tadq.quant.quantizer import quantizers_bypassed
from tadq.quant.rotation import hadamard_block_size, hadamard_matrix, rotate_channels
from tadq.quant.transformed import TransformedQuantLayer, quantize_layer
from tadq.recipe import Deployment, NaiveMethod, Recipe
from tadq.search import Budget, plan_search, run_search
from tadq.search import search as search_module
from tadq.search.report import report_payload
from tadq.search.search import export_winner
from tadq.svdquant import SVDQuantMethod
from tadq.svdquant import method as svdquant_method
from tadq.svdquant import sensitivity as sensitivity_module
from tadq.svdquant.cost import cost_summary
from tadq.svdquant.sensitivity import LayerSensitivity, choose_high_precision, layer_bits, layer_sensitivities

EPS32 = torch.finfo(torch.float32).eps
TIMING_KEYS = ("build_seconds", "score_seconds", "reused")  # how long, and whether this run did the work


def _gamma(n: int) -> float:
    """γ_n = n·u / (1 − n·u): the relative bound of n float32 roundings (Higham), u the unit roundoff."""
    unit = EPS32 / 2
    return n * unit / (1 - n * unit)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the space -------------------------------------------------------------------------------------------------


def test_a_name_given_twice_is_one_candidate_and_a_string_axis_is_refused():
    space = tiny_space(presets=("W8A8", "w8a8 "), bases=("naive", " NAIVE"), stacks=("none", "None"))
    assert (space.presets, space.bases, space.stacks) == (("W8A8",), ("naive",), ("none",))
    assert [c.name for c in space.candidates()] == ["naive-W8A8"]  # was four copies: built once, reported 4×
    for axis in ("presets", "bases", "stacks", "fp_layers"):
        with pytest.raises(ValueError, match=f"SearchSpace.{axis} must be a tuple of names"):
            tiny_space(**{axis: {"presets": "W4A4", "bases": "naive", "stacks": "none", "fp_layers": "none"}[axis]})


@pytest.mark.parametrize(("options", "message"), [
    ({"heldout_trajectories": 2.5}, "heldout_trajectories must be an integer"),
    ({"heldout_trajectories": True}, "heldout_trajectories must be an integer"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"tie_db": float("nan")}, "tie_db must be a finite number"),
    ({"tie_db": -0.1}, "tie_db must be a finite number"),
])
def test_run_search_refuses_bad_counts_before_any_work(tmp_path, options, message):
    out = tmp_path / "search"
    with pytest.raises(ValueError, match=message):
        run_search(build_tiny_unet(), tiny_scheduler(), tiny_space(presets=("W8A8",), bases=("naive",),
                                                                   stacks=("none",)),
                   Budget("gbitops", 1e6), out, progress=False, **({"heldout_trajectories": 2} | options))
    assert not out.exists()  # nothing written: refused before the cache folder, calibration or sampling


def test_a_byte_budget_no_candidate_fits_names_the_smallest_artefact():
    # W4A16 has fewer weight bytes than W8A8 but more bit-operations (4·32 > 8·8 bits per MAC): the refusal must
    # name the candidate closest to the budget in the budget's own measure
    model = build_tiny_unet()
    space = tiny_space(presets=("W8A8", "W4A16"), bases=("naive",), stacks=("none",))
    with pytest.raises(ValueError, match="the cheapest, naive-W4A16: its weight codes alone take"):
        plan_search(model, space, Budget("bytes", 1))
    with pytest.raises(ValueError, match="the cheapest, naive-W8A8: costs"):
        plan_search(model, space, Budget("gbitops", 1e-12))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_the_cli_refuses_a_non_finite_budget_before_loading_the_model(tmp_path, value):
    # the model folder does not exist: a refusal that names the budget came before anything was loaded
    result = CliRunner().invoke(app, ["recipe", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
                                      "--budget-gbitops", value])
    assert result.exit_code == 2, result.output
    assert "--budget-gbitops must be a finite number > 0" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


# --- resuming ---------------------------------------------------------------------------------------------------


def test_a_stale_sidecar_never_vouches_for_a_rewritten_model(tmp_path, monkeypatch):
    """A run with other settings stopped between rewriting a candidate's model folder and its sidecar: the next run
    with the first settings must rebuild, not load (and export) the other settings' model under its own recipe."""
    model, scheduler = build_tiny_unet(), tiny_scheduler()
    first = tiny_space(presets=("W8A8",), bases=("naive",), stacks=("none",))
    other_calibration = CalibrationConfig(sampler=SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=4,
                                          seed=0, batch_size=4)
    other = tiny_space(presets=("W8A8",), bases=("naive",), stacks=("none",), calibration=other_calibration)
    budget = Budget("gbitops", 1e6)
    original = run_search(model, scheduler, first, budget, tmp_path, heldout_trajectories=2, progress=False)
    export_winner(original, tmp_path, scheduler)
    weights = tmp_path / "model" / "tadq_weights.safetensors"
    expected = _digest(weights)

    write = search_module.atomic_write_json

    def stop_at_the_sidecar(payload, path):
        if path.parent.name == "models":
            raise KeyboardInterrupt  # the model folder is rewritten, its sidecar not yet
        write(payload, path)

    monkeypatch.setattr(search_module, "atomic_write_json", stop_at_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        run_search(model, scheduler, other, budget, tmp_path, heldout_trajectories=2, progress=False)
    monkeypatch.setattr(search_module, "atomic_write_json", write)

    again = run_search(model, scheduler, first, budget, tmp_path, heldout_trajectories=2, progress=False)
    assert again.stats["bases_built"] == 1  # the folder holds the other settings' model: rebuilt
    export_winner(again, tmp_path, scheduler)
    assert _digest(weights) == expected
    assert again.record("naive-W8A8")["score"] == original.record("naive-W8A8")["score"]


def test_a_model_folder_deleted_from_the_cache_is_rebuilt_not_reused(tmp_path):
    model, scheduler = build_tiny_unet(), tiny_scheduler()
    space = tiny_space(presets=("W8A8",), bases=("naive",), stacks=("none",))
    budget = Budget("gbitops", 1e6)
    first = run_search(model, scheduler, space, budget, tmp_path, heldout_trajectories=2, progress=False)
    shutil.rmtree(tmp_path / first.record("naive-W8A8")["artefact"])  # its sidecar and record stay
    again = run_search(model, scheduler, space, budget, tmp_path, heldout_trajectories=2, progress=False)
    assert again.stats["bases_built"] == 1 and again.stats["candidates_reused"] == 0
    export_winner(again, tmp_path, scheduler)  # used to fail here, after the whole search: no model to export
    assert again.record("naive-W8A8")["score"] == first.record("naive-W8A8")["score"]


def test_an_edited_or_damaged_candidate_record_is_scored_again_not_trusted(tmp_path):
    """A record's score key vouches for its settings, not for the rest of the file: a record whose recipe was
    edited exported that recipe beside the candidate's model, one whose artefact named another candidate exported
    that one's model, and a score or cost of the wrong type ended the rerun in a TypeError or KeyError traceback.
    Expected: such a record is scored again, and the rerun ends as the first run did."""
    model, scheduler = build_tiny_unet(), tiny_scheduler()
    space = tiny_space(presets=("W8A8",), bases=("naive",), stacks=("none", "ptqd"))
    budget = Budget("gbitops", 1e6)
    first = run_search(model, scheduler, space, budget, tmp_path / "first", heldout_trajectories=2, progress=False)
    export_winner(first, tmp_path / "first", scheduler)
    name = first.winner
    other = next(r["name"] for r in first.records if r["name"] != name)
    edits = {
        "recipe": lambda r: r["recipe"]["data"]["weights"]["data"].update(bits=4),
        "artefact": lambda r: r.update(artefact=f"cache/models/{other}"),
        "score-type": lambda r: r["score"].update(median_psnr="high"),
        "score-nan": lambda r: r["score"].update(median_psnr=math.nan),
        "no-gbitops": lambda r: r.pop("gbitops"),
        "status": lambda r: r.update(status="diverged"),
    }
    for tag, edit in edits.items():
        out = shutil.copytree(tmp_path / "first", tmp_path / tag)
        path = out / "cache" / "candidates" / f"{name}.json"
        record = json.loads(path.read_text())
        edit(record)
        path.write_text(json.dumps(record))
        again = run_search(model, scheduler, space, budget, out, heldout_trajectories=2, progress=False)
        assert again.stats["candidates_scored"] == 1 and again.stats["candidates_reused"] == 1, tag
        assert again.winner == name and again.record(name)["score"] == first.record(name)["score"], tag
        export_winner(again, out, scheduler)
        for exported in ("recipe.json", "model/tadq_weights.safetensors", "model/corrections.safetensors"):
            if (tmp_path / "first" / exported).is_file() or (out / exported).is_file():
                assert _digest(out / exported) == _digest(tmp_path / "first" / exported), (tag, exported)


@pytest.mark.slow  # 16 s on a 2-core AVX2 CPU; test_recipe_search.py interrupts a search in the default suite
def test_an_interrupted_svdquant_search_ends_as_an_uninterrupted_one(tmp_path):
    """Same seed, same space: the resumed search chooses the same winner with the same scores, recipe.json and
    weights (bytes), and its report differs from the uninterrupted one's only in timings and work counters."""
    space = tiny_space(presets=("W4A8",), bases=("naive", "svdquant"), stacks=("none", "tac"))
    budget = Budget("gbitops", 1e6)

    def search(out, stop_after=None):
        model, scheduler = build_tiny_unet(), tiny_scheduler()
        finished = []

        def interrupt(record):
            finished.append(record["name"])
            if len(finished) == stop_after:
                raise KeyboardInterrupt

        result = run_search(model, scheduler, space, budget, out, heldout_trajectories=3, progress=False,
                            on_candidate=interrupt)
        export_winner(result, out, scheduler)
        return result

    whole = search(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "resumed", stop_after=3)  # naive, naive+tac and the SVDQuant base finished
    resumed = search(tmp_path / "resumed")
    assert resumed.stats["bases_built"] == 0 and resumed.stats["candidates_reused"] == 3
    for name in ("recipe.json", "model/tadq_weights.safetensors"):
        assert _digest(tmp_path / "whole" / name) == _digest(tmp_path / "resumed" / name), name

    def stable(result):
        payload = report_payload(result)
        payload["stats"] = None
        payload["candidates"] = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in payload["candidates"]]
        return json.dumps(payload, sort_keys=True)

    assert stable(whole) == stable(resumed)
    assert all(r["status"] == "scored" for r in whole.records)


# --- mixed precision --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w4a8():
    torch.manual_seed(0)
    calibration = CalibrationConfig(sampler=SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=4,
                                    batch_size=4)
    recipe = Recipe.from_preset("W4A8", method=NaiveMethod(), calibration=calibration,
                                deployments=(Deployment(SAMPLER),))
    qmodel = api.quantize(build_tiny_unet(), tiny_scheduler(), recipe, progress=False)
    sensitivities = [LayerSensitivity(name, 1, 1.0 + i) for i, name in enumerate(layer_bits(qmodel))]
    return qmodel, sensitivities


@pytest.mark.parametrize(("budget", "options", "message"), [
    (math.inf, {}, "budget_bitops must be a finite number"),  # was OverflowError in int() after the greedy loop
    (math.nan, {}, "budget_bitops must be a finite number"),  # passed the below-base check, then ValueError in int()
    (10**18, {"high_bits": 9}, "high_bits must be an integer in 2..8"),
    (10**18, {"high_bits": 8.0}, "high_bits must be an integer in 2..8"),
])
def test_mixed_precision_refuses_budgets_and_bits_no_plan_can_have(w4a8, budget, options, message):
    qmodel, sensitivities = w4a8
    with pytest.raises(ValueError, match=message):
        choose_high_precision(qmodel, sensitivities, budget, **options)


def test_mixed_precision_refuses_a_layer_named_twice_or_unknown(w4a8):
    qmodel, sensitivities = w4a8
    with pytest.raises(ValueError, match="named more than once"):  # was listed twice in high_layers
        choose_high_precision(qmodel, [*sensitivities, sensitivities[0]], 10**18)
    with pytest.raises(ValueError, match="not quantized layers of this model: \\['no.such.layer'\\]"):
        choose_high_precision(qmodel, [*sensitivities, LayerSensitivity("no.such.layer", 1, 9.0)], 10**18)


def test_mixed_precision_refuses_an_undefined_sensitivity(w4a8):
    qmodel, sensitivities = w4a8
    broken = [LayerSensitivity(s.name, s.macs, math.nan if i == 1 else s.error) for i, s in enumerate(sensitivities)]
    with pytest.raises(ValueError, match=f"NaN or negative for \\['{sensitivities[1].name}'\\]"):
        choose_high_precision(qmodel, broken, 10**18)  # NaN sorted arbitrarily in the greedy order


def test_sensitivities_refuse_unknown_or_repeated_layers_before_sampling(w4a8, monkeypatch):
    qmodel, sensitivities = w4a8

    def never(*args, **kwargs):
        raise AssertionError("sampled before the layers were checked")

    monkeypatch.setattr(sensitivity_module, "sample_loop", never)
    name = sensitivities[0].name
    for layers, message in ((["no.such.layer"], "not quantized layers"), ([name, name], "named more than once"),
                            (name, "the string")):
        with pytest.raises(ValueError, match=message):
            layer_sensitivities(qmodel, tiny_scheduler(), SAMPLER, num_samples=2, layers=layers)


def test_cost_summary_refuses_a_step_count_that_is_no_positive_integer(w4a8):
    qmodel, _ = w4a8
    assert cost_summary(qmodel, 2)["bitops"] == 2 * cost_summary(qmodel, 1)["bitops"] > 0
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):  # 0 and -3 gave 0 / negative costs
            cost_summary(qmodel, steps)


def test_mixed_precision_above_the_most_expensive_plan_raises_every_layer_and_never_lowers_one(w4a8):
    qmodel, sensitivities = w4a8
    every = choose_high_precision(qmodel, sensitivities, 10**18)
    assert sorted(every.high_layers) == sorted(layer_bits(qmodel)) and every.bitops == every.all_high_bitops
    # "raising" a W4A8 network to 4 bits would lower every activation to 4 bits at a saving: nothing is raised
    lowered = choose_high_precision(qmodel, sensitivities, 10**18, high_bits=4)
    assert lowered.high_layers == () and lowered.bitops == lowered.base_bitops


# --- SVDQuant pieces --------------------------------------------------------------------------------------------


def test_lowrank_refuses_a_rank_that_is_no_integer_and_caps_a_rank_beyond_the_layer():
    weight = torch.randn(4, 4, 3, 3)
    for rank in (2.5, True, 0, -1):
        with pytest.raises(ValueError, match="rank must be an integer >= 1"):
            lowrank_split(weight, rank)
    with pytest.raises(ValueError, match="exceeds min"):
        lowrank_split(weight, 5)
    assert effective_rank(4, 36, 10**6) == 2 and effective_rank(1, 36, 4) == 0 and effective_rank(4, 36, 0) == 0


def test_a_rank_beyond_every_layer_is_capped_and_branch_plus_residual_is_the_transformed_weight():
    """SVDQuant with rank 10**6 on the tiny UNet (4- and 8-channel layers, a 1-channel output conv): every layer's
    branch has the capped rank and residual + U·D equals W·diag(s) within the float32 bound of the split."""
    torch.manual_seed(0)
    model = build_tiny_unet()
    originals = {name: m.weight.detach().clone() for name, m in model.named_modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    calibration = CalibrationConfig(sampler=SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=4,
                                    batch_size=4)
    recipe = Recipe(method=SVDQuantMethod(alpha_grid=(0.0, 1.0), search_samples=4),  # both ends of the range
                    weights=QScheme(bits=4, granularity="per_channel", lowrank_rank=10**6),
                    activations=QScheme(bits=8, granularity="per_group", group_size=4, smoothing=True),
                    calibration=calibration, deployments=(Deployment(SAMPLER),))
    qmodel = api.quantize(model, tiny_scheduler(), recipe, progress=False)
    layers = {name: m for name, m in qmodel.model.named_modules() if isinstance(m, TransformedQuantLayer)}
    assert layers and qmodel.model.conv_out.rank == 0  # one output channel: no branch
    for name, layer in layers.items():
        weight = layer.weight
        assert layer.rank == effective_rank(weight.shape[0], int(weight[0].numel()), 10**6), name
        target = layer.input_transform_of_weight(originals[name]).double()
        if not layer.rank:
            continue
        up, down = layer.lowrank_up.double(), layer.lowrank_down.reshape(layer.rank, -1).double()
        magnitude = (target.abs() + (up.abs() @ down.abs()).reshape(target.shape))
        error = (layer.effective_weight().double() - target).abs()
        assert bool((error <= _gamma(layer.rank + 2) * magnitude).all()), name


# ≈ 9 s on a 2-core AVX2 CPU (the network fitted twice): `make test-slow`
@pytest.mark.slow
def test_svdquant_fitted_in_groups_of_layers_is_the_network_fitted_from_one_recording(monkeypatch):
    """A record-size limit below every layer's inputs records and fits each layer in its own pass (what keeps a
    large model's recorded inputs bounded) and gives the same network, bit for bit, as recording every layer at
    once."""
    calibration = CalibrationConfig(sampler=SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=4,
                                    batch_size=4)
    recipe = Recipe(method=SVDQuantMethod(alpha_grid=(0.2, 0.8), search_samples=4),
                    weights=QScheme(bits=4, granularity="per_channel", lowrank_rank=2),
                    activations=QScheme(bits=4, granularity="per_group", group_size=4, smoothing=True,
                                        rotation="hadamard"),
                    calibration=calibration, deployments=(Deployment(SAMPLER),))
    record = svdquant_method._record_inputs
    passes = []

    def counted(qmodel, layers, calibration, rows, batch_size):
        passes.append(len(layers))
        return record(qmodel, layers, calibration, rows, batch_size)

    monkeypatch.setattr(svdquant_method, "_record_inputs", counted)
    built = {}
    for limit in (svdquant_method.RECORD_BYTES, 1):
        monkeypatch.setattr(svdquant_method, "RECORD_BYTES", limit)
        passes.clear()
        qmodel = api.quantize(build_tiny_unet(), tiny_scheduler(), recipe, progress=False)
        built[limit] = (dict(qmodel.state_dict()), qmodel.svdquant_report["layers"], list(passes))
    (whole, whole_fits, whole_passes), (grouped, grouped_fits, grouped_passes) = built.values()
    layers = len(whole_fits)
    assert whole_passes[1:] == [layers]  # after the one-row size probe: every layer in one recording
    assert grouped_passes[1:] == [1] * layers  # one layer per recording
    assert grouped_fits == whole_fits
    assert whole.keys() == grouped.keys() and all(torch.equal(whole[k], grouped[k]) for k in whole)


def test_svdquant_alpha_grid_must_be_numbers_in_the_unit_interval():
    assert SVDQuantMethod(alpha_grid=(0, 1)).alpha_grid == (0.0, 1.0)
    for grid in ("0.5", (0.5, None), (True,), (1.5,), (-0.1,), (math.nan,), ()):
        with pytest.raises(ValueError, match="alpha_grid"):
            SVDQuantMethod(alpha_grid=grid)


def test_rotation_of_a_channel_count_that_is_no_power_of_two_stays_within_its_blocks():
    """12 channels rotate in blocks of 4 (the largest power of two dividing 12), 7 channels not at all; the folded
    12-channel linear gives the FP output within float32 rounding of its two rotations and its product."""
    assert (hadamard_block_size(12), hadamard_block_size(7)) == (4, 1)
    outlier = torch.zeros(1, 12)
    outlier[0, 5] = 8.0
    spread = rotate_channels(outlier, -1)
    assert torch.equal(spread[0, 4:8].abs(), torch.full((4,), 4.0))  # 8 / √4 on each channel of its block
    assert not spread[0, :4].any() and not spread[0, 8:].any()
    odd = torch.randn(3, 7)
    assert torch.equal(rotate_channels(odd, -1), odd)
    torch.manual_seed(0)
    module = torch.nn.Linear(12, 6)
    layer = quantize_layer(module, QScheme(bits=4, granularity="per_channel"), QScheme(bits=8, rotation="hadamard"))
    x = torch.randn(5, 12)
    with quantizers_bypassed(layer):
        result = layer(x)
    # |W|·|H|·|H|·|x| + |b| dominates every rounded quantity (|H|·|H| ≥ I elementwise); the roundings: the fold
    # W·H and the online H·x (4 terms each), the 12-term product and the bias
    absolute = torch.block_diag(*[hadamard_matrix(4)] * 3).abs()
    magnitude = (module.weight.abs() @ absolute @ absolute @ x.abs().T + module.bias.abs()[:, None]).T
    bound = _gamma(4 + 4 + 12 + 1) * magnitude
    assert bool(((result - module(x)).abs() <= bound).all())


def test_an_edited_hadamard_matrix_never_changes_later_rotations():
    edited = hadamard_matrix(4, torch.float64)
    edited.mul_(2)  # a caller's own copy; the float64 CPU matrix used to be the cached tensor itself
    assert torch.equal(hadamard_matrix(4, torch.float64).abs(), torch.full((4, 4), 0.5, dtype=torch.float64))
    assert torch.equal(hadamard_matrix(4, torch.float64) @ hadamard_matrix(4, torch.float64),
                       torch.eye(4, dtype=torch.float64))


# --- the evaluation after the search -----------------------------------------------------------------------------


def _evaluated(monkeypatch, diverging: str) -> tuple[dict, str]:
    """``evaluate_candidates`` over two scored candidates (both README rows) whose artefacts stand in by name: the
    ``diverging`` one samples NaN on the evaluation seed, the other one FP plus a small offset. Returns the
    evaluation and the Markdown report."""
    from tadq.config import config_to_dict
    from tadq.search import Candidate
    from tadq.search import evaluate as evaluate_module
    from tadq.search.report import markdown_report
    from tadq.search.search import SearchResult

    space = tiny_space(bases=("naive", "qdiffusion"), presets=("W8A8",), stacks=("none",))
    records = [{"name": c.name, "base": c.base, "preset": c.preset, "stack": c.stack_name, "fp_layers": c.fp_layers,
                "gbitops": 1.0, "bytes": 10, "status": "scored", "recipe": config_to_dict(space.recipe(c)),
                "artefact": f"cache/models/{c.name}", "score": {"median_psnr": 30.0}}
               for c in (Candidate("naive", "W8A8"), Candidate("qdiffusion", "W8A8"))]
    result = SearchResult(records, "qdiffusion-W8A8", "best", ["qdiffusion-W8A8"],
                          {"calibration": 0, "heldout": 200_000, "evaluation": 1000}, {}, Budget("gbitops", 2.0))

    def samples(denoiser, *args, num_samples, **kwargs):
        images = torch.zeros(num_samples, 1, 16, 16)
        if denoiser == diverging:
            return images.fill_(float("nan"))
        return images if denoiser == "fp" else images + 0.1

    monkeypatch.setattr(evaluate_module, "load", lambda folder: (folder.name, None))
    monkeypatch.setattr(evaluate_module, "final_samples", samples)
    evaluation = evaluate_module.evaluate_candidates(result, "fp", None, "out", num_samples=2)
    json.dumps(evaluation, allow_nan=False)  # report.json stays strict JSON
    return evaluation, markdown_report(result, evaluation)


def test_a_candidate_diverging_on_the_evaluation_seed_is_reported_not_a_crash(monkeypatch):
    """Finite on the held-out noise, NaN on the evaluation seed: PSNR of its samples raised after the whole search
    and export, and --evaluate never wrote a report; now its row says so and the rest are compared."""
    evaluation, markdown = _evaluated(monkeypatch, diverging="naive-W8A8")
    row = evaluation["rows"]["naive-W8A8"]
    assert row["diverged"] == "2 of 2 samples hold NaN or Inf" and row["mean_psnr"] is None
    assert evaluation["rows"]["qdiffusion-W8A8"]["mean_psnr"] > 0
    assert "no README row other than the winner" in evaluation["summary"]  # the diverged row is not compared
    assert "naive-W8A8 (diverged: 2 of 2 samples hold NaN or Inf)" in markdown
    evaluation, _ = _evaluated(monkeypatch, diverging="qdiffusion-W8A8")
    assert evaluation["summary"].startswith("the winner qdiffusion-W8A8 diverged on the evaluation seed 1000")


def test_a_rerun_with_another_batch_size_rescores_instead_of_reusing(tmp_path):
    """The sampling batch moves quantized samples (README: What the batch size changes) and keys tadq run's cells;
    the search's records were keyed without it, so a rerun with another --batch-size reported scores drawn at the
    old one beside candidates scored at the new one."""
    torch.manual_seed(0)
    model, scheduler = build_tiny_unet(), tiny_scheduler()
    space = tiny_space(bases=("naive",), presets=("W8A8",), stacks=("none",))

    def search(batch_size: int):
        return run_search(model, scheduler, space, Budget("gbitops", 1e6), tmp_path, heldout_trajectories=4,
                          batch_size=batch_size, progress=False)

    assert search(4).stats["candidates_scored"] == 1
    same = search(8)  # a batch over the 4 held-out trajectories samples them in the same one batch
    assert same.stats["candidates_scored"] == 0 and same.stats["candidates_reused"] == 1
    assert search(2).stats["candidates_scored"] == 1  # was reused: scored at batch 4
    assert len(list(tmp_path.glob("cache/reference-*.safetensors"))) == 2  # the FP reference of each batch


def test_the_pareto_figure_names_why_each_candidate_was_not_drawn(monkeypatch, tmp_path):
    """pareto.png said "N candidates over budget, not scored" for every unscored candidate: one that diverged on
    the held-out noise (within the budget) was reported as over it."""
    from tadq.search import report as report_module
    from tadq.search.search import SearchResult

    def record(name: str, status: str, score: float | None) -> dict:
        return {"name": name, "base": "naive", "gbitops": 1.0, "bytes": 10, "status": status,
                "score": None if score is None else {"median_psnr": score}}

    records = [record("a", "scored", 30.0), record("b", "diverged", None), record("c", "over budget", None),
               record("d", "over budget", None)]
    result = SearchResult(records, "a", "best", ["a"], {"calibration": 0, "heldout": 1, "evaluation": 2}, {},
                          Budget("gbitops", 2.0))
    kept = []
    monkeypatch.setattr(report_module, "save_figure", lambda fig, path, **options: kept.append(fig))
    report_module.plot_pareto(result, tmp_path / "pareto.png")
    texts = [text.get_text() for text in kept[0].axes[0].texts]
    assert "1 diverged" in " ".join(texts) and "2 over budget" in " ".join(texts)
    assert "3 candidates over budget" not in " ".join(texts)


def test_images_smaller_than_the_ssim_window_are_evaluated_without_ssim(tmp_path):
    """A 4 x 4 pixel model: SSIM's 11 x 11 window does not fit, and ``ssim_per_sample`` raised after the whole search
    and every evaluation sample (no report); ``tadq run`` reports it as not measured, and so does --evaluate now,
    with PSNR and the final MSE still measured."""
    from diffusers import UNet2DModel

    from tadq.search.evaluate import evaluate_candidates
    from tadq.search.report import markdown_report

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    scheduler = tiny_scheduler()
    space = tiny_space(bases=("naive",), presets=("W8A8",), stacks=("none",))
    result = run_search(model, scheduler, space, Budget("gbitops", 1e6), tmp_path, heldout_trajectories=4,
                        progress=False)
    evaluation = evaluate_candidates(result, model, scheduler, tmp_path, num_samples=4)
    row = evaluation["rows"]["naive-W8A8"]
    assert row["ssim"] is None
    assert math.isfinite(row["mean_psnr"]) and row["final_mse"] > 0
    assert "| **naive-W8A8** | yes |" in markdown_report(result, evaluation)
    json.dumps(evaluation, allow_nan=False)
