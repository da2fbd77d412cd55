"""The search loop of ``tadq recipe``: every candidate within the budget built once, scored on held-out noise, the
best one chosen (docs/recipe_search.md).

Reuse, from the most expensive piece down:

- the calibration set is collected once (and cached on disk) and shared by every base;
- a base (naive, Q-Diffusion, SVDQuant or smoothing-only, at one preset and one set of floating-point layers) is
  quantized once and every correction
  stack is fitted on it;
- a stack is fitted on top of its parent: ``tac+tcec`` is TCEC fitted on the saved ``tac`` model (the same fit
  ``fit_corrections`` would do for the whole stack: each member is fitted with the earlier ones active);
- the FP reference samples of the held-out seed are computed once.

Every finished model is saved as an artefact and every finished candidate as a JSON record under
``DIR/cache/``, each keyed by everything that changes it (model weights, scheduler, the candidate's recipe; for
the record also the held-out seed, count and sampling batch): an interrupted run resumes from them, and a rerun
with the same settings neither builds, fits nor scores anything. Nothing is pickled (artefacts are safetensors + JSON).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tadq._version import __version__
from tadq.api import check_conditions, load, quantize
from tadq.calibration import collect_calibration_set, model_fingerprint
from tadq.config import config_to_dict
from tadq.corrections.attach import fit_corrections
from tadq.corrections.fp_cache import FPTrajectoryCache
from tadq.denoiser import QuantizedDenoiser
from tadq.io import save_quantized
from tadq.progress import progress_bar, show_next
from tadq.recipe import Recipe, save_recipe
from tadq.registry import adapter_for
from tadq.safefiles import (
    DamagedFileError,
    finite_float,
    load_checked,
    nonfinite_count,
    read_json_file,
    save_checked,
)
from tadq.sampling import ConditionSource
from tadq.search.score import HeldOutScore, check_seeds, final_samples, heldout_seed, score_samples
from tadq.search.space import (
    Budget,
    Candidate,
    SearchSpace,
    codes_lower_bound_bytes,
    forward_macs,
    gbitops_per_sample,
    quantized_layers,
)
from tadq.utils import atomic_write_json

__all__ = ["SearchConditions", "SearchPlan", "SearchResult", "plan_search", "run_search", "choose_winner",
           "pareto_front", "export_winner", "REPORT_FILES", "TIE_DB"]

logger = logging.getLogger(__name__)

FORMAT = 1  # of the cache records; bump when what a record means changes
REPORT_FILES = ("report.json", "report.md", "pareto.png")  # what ``tadq.search.report.write_report`` writes
TIE_DB = 0.05
"""Scores within this many dB of the best count as a tie; the cheaper candidate wins it."""
ARTEFACT_FILES = ("tadq_weights.safetensors", "corrections.safetensors")


@dataclass
class SearchPlan:
    """What a search will do, known before any expensive work: every candidate's recipe and bit-operations, and
    which candidates the budget rules out (``ruled_out``: name → reason)."""

    space: SearchSpace
    budget: Budget
    candidates: list[Candidate]
    recipes: dict[str, Recipe]
    gbitops: dict[str, float]
    ruled_out: dict[str, str]

    @property
    def feasible(self) -> list[Candidate]:
        return [c for c in self.candidates if c.name not in self.ruled_out]


def plan_search(model: nn.Module, space: SearchSpace, budget: Budget) -> SearchPlan:
    """Costs and budget filter from the quantization plans alone (one FP forward, no calibration).

    Raises ``ValueError`` when no candidate can fit the budget, naming the cheapest one. A conditional model's MACs
    are counted on placeholder conditioning.
    """
    macs = forward_macs(model)
    candidates = space.candidates()
    recipes = {c.name: space.recipe(c) for c in candidates}
    per_structure: dict[tuple[str, str, str], tuple[float, int]] = {}  # (base, preset, fp_layers) → costs
    gbitops: dict[str, float] = {}
    floors: dict[str, int] = {}
    ruled_out: dict[str, str] = {}
    for candidate in candidates:
        key = (candidate.base, candidate.preset, candidate.fp_layers)
        if key not in per_structure:
            recipe = recipes[candidate.name]
            quantized = quantized_layers(model, recipe)
            per_structure[key] = (gbitops_per_sample(model, recipe, macs, quantized),
                                  codes_lower_bound_bytes(model, recipe, quantized))
        cost, floor = per_structure[key]
        gbitops[candidate.name], floors[candidate.name] = cost, floor
        if budget.kind == "gbitops" and not budget.fits(cost, None):
            ruled_out[candidate.name] = f"{cost:.4g} Gbit-ops/sample > budget {budget.value:.4g}"
        elif budget.kind == "bytes" and floor > budget.value:
            ruled_out[candidate.name] = f"its weight codes alone take {floor} bytes > budget {int(budget.value)}"
    plan = SearchPlan(space, budget, candidates, recipes, gbitops, ruled_out)
    if not plan.feasible:  # the cheapest in the budget's own measure (fewest bits per MAC ≠ fewest weight bytes)
        if budget.kind == "bytes":
            cheapest = min(candidates, key=lambda c: (floors[c.name], gbitops[c.name]))
            why = ruled_out[cheapest.name]
        else:
            cheapest = min(candidates, key=lambda c: gbitops[c.name])
            why = f"costs {gbitops[cheapest.name]:.4g} Gbit-ops/sample ({ruled_out[cheapest.name]})"
        raise ValueError(f"the budget {budget.describe()} is too small for every candidate; the cheapest, "
                         f"{cheapest.name}: {why}")
    return plan


@dataclass(frozen=True)
class SearchConditions:
    """What a conditional or latent model needs around its denoiser in a search.

    Args:
        conditions: per-sample conditions (class labels, prompts) of calibration, fits and held-out scoring, drawn
            from (seed, index): the held-out seed draws its own from the same source. Never the evaluation prompts:
            ``evaluate_candidates`` takes those separately. ``None``: an unconditional model.
        decoder: latents (N, C, h, w) → images in [-1, 1] (a latent model's VAE); scores are PSNR on its images.
        decoder_key: names the decoder in the cache keys (e.g. a digest of the VAE's files); required with it.
    """

    conditions: ConditionSource | None = None
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    decoder_key: str | None = None

    def __post_init__(self) -> None:
        if (self.decoder is None) != (self.decoder_key is None):
            raise ValueError("SearchConditions: give a decoder together with its decoder_key (what names it in the "
                             "cache), or neither")

    def key(self) -> dict[str, str | None]:
        return {"conditions": None if self.conditions is None else self.conditions.key, "decoder": self.decoder_key}

    def options(self, guidance_scale: float) -> dict[str, Any]:
        """``final_samples``' keyword arguments."""
        return {"conditions": self.conditions, "guidance_scale": guidance_scale, "decoder": self.decoder}


@dataclass
class SearchResult:
    """Every candidate's record (JSON-ready dicts, in search order), the winner's name and why, and counters of
    the work done in this run (``stats``: bases_built, corrections_fitted, candidates_scored, candidates_reused,
    models_loaded)."""

    records: list[dict[str, Any]]
    winner: str
    reason: str
    front: list[str]
    seeds: dict[str, int]
    stats: dict[str, int]
    budget: Budget
    settings: dict[str, Any] = field(default_factory=dict)

    def record(self, name: str) -> dict[str, Any]:
        return next(r for r in self.records if r["name"] == name)


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _artefact_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.name in ARTEFACT_FILES)


class _Builder:
    """Builds (or loads from the cache) the network of each candidate, fitting only what its parent lacks."""

    def __init__(self, model: nn.Module, scheduler, plan: SearchPlan, cache: Path, model_key: str,
                 stats: dict[str, int], progress: bool, conditions: ConditionSource | None) -> None:
        self.model, self.scheduler, self.plan, self.cache = model, scheduler, plan, cache
        self.conditions = conditions
        self.model_key, self.stats, self.progress = model_key, stats, progress
        self.saving_scheduler = copy.deepcopy(scheduler)  # saving adds keys to a scheduler's config: not the caller's
        self.memo: dict[str, QuantizedDenoiser] = {}
        self.timings: dict[str, float] = {}
        self._calibration = None
        self.fp_trajectories = FPTrajectoryCache(model)  # candidates' correction fits share their FP walks

    def build_key(self, candidate: Candidate) -> str:
        return _digest({"format": FORMAT, "model": self.model_key, "recipe": config_to_dict(self.recipe(candidate))})

    def recipe(self, candidate: Candidate) -> Recipe:
        return self.plan.recipes.get(candidate.name) or self.plan.space.recipe(candidate)

    def folder(self, candidate: Candidate) -> Path:
        return self.cache / "models" / candidate.name

    def calibration(self):
        if self._calibration is None:
            space = self.plan.space
            self._calibration = collect_calibration_set(self.model, adapter_for(self.model), self.scheduler.config,
                                                        space.calibration, cache_dir=self.cache,
                                                        progress=self.progress, conditions=self.conditions,
                                                        guidance_scale=space.guidance_scale)
        return self._calibration

    def cached(self, candidate: Candidate) -> bool:
        """Whether the candidate's model is in the cache: its sidecar names this build and its weights are there
        (a folder deleted by hand left a sidecar whose reused record failed only when the winner was exported)."""
        folder = self.folder(candidate)
        sidecar = folder.with_suffix(".json")
        if not (folder / ARTEFACT_FILES[0]).is_file():
            return False
        try:
            return sidecar.is_file() and read_json_file(sidecar, "model record")["build_key"] == \
                self.build_key(candidate)
        except (ValueError, KeyError, TypeError):
            return False

    def get(self, candidate: Candidate) -> QuantizedDenoiser:
        if candidate.name in self.memo:
            return self.memo[candidate.name]
        folder, recipe = self.folder(candidate), self.recipe(candidate)
        if self.cached(candidate):
            try:
                qmodel, _ = load(folder)
                self.stats["models_loaded"] += 1
                self.memo[candidate.name] = qmodel
                return qmodel
            except (ValueError, OSError) as error:  # a damaged cache entry is rebuilt, never trusted
                logger.warning("rebuilding %s: its cached artefact cannot be read (%s)", candidate.name, error)
        start = time.perf_counter()
        if candidate.parent is None:
            checkpoint = self.cache / "models" / f"{candidate.name}.checkpoint.safetensors"
            qmodel = quantize(self.model, self.scheduler, recipe, calibration=self.calibration(),
                              checkpoint=checkpoint if recipe.method.base_method == "qdiffusion" else None,
                              progress=self.progress, conditions=self.conditions)
            self.stats["bases_built"] += 1
        else:
            parent = self.get(candidate.parent)
            qmodel = fit_corrections(parent, self.model, self.scheduler, recipe.sampler, recipe.corrections[-1:],
                                     fp_trajectories=self.fp_trajectories, conditions=self.conditions,
                                     guidance_scale=recipe.guidance_scale)
            self.stats["corrections_fitted"] += 1
        qmodel.recipe = recipe
        self.timings[candidate.name] = time.perf_counter() - start
        # the sidecar names what the folder holds: drop the old one first, so that a run stopped while the folder
        # is rewritten leaves no sidecar vouching for a model of other settings
        folder.with_suffix(".json").unlink(missing_ok=True)
        save_quantized(qmodel, folder, self.saving_scheduler, overwrite=True)
        atomic_write_json({"build_key": self.build_key(candidate), "name": candidate.name,
                           "seconds": self.timings[candidate.name]}, folder.with_suffix(".json"))
        if candidate.parent is None:
            checkpoint.unlink(missing_ok=True)
        self.memo[candidate.name] = qmodel
        return qmodel


def _reference(model: nn.Module, scheduler, space: SearchSpace, seed: int, count: int, cache: Path,
               model_key: str, batch_size: int, conditioning: SearchConditions) -> torch.Tensor:
    """FP final images of the held-out seed (cached)."""
    guidance = {} if space.guidance_scale == 1.0 else {"guidance_scale": space.guidance_scale}
    key = _digest({"model": model_key, "sampler": config_to_dict(space.sampler), "seed": seed, "count": count,
                   "batch": min(batch_size, count), **guidance})
    path = cache / f"reference-{key}.safetensors"
    if path.is_file():
        try:
            tensors, meta = load_checked(path, "held-out reference")
            if meta.get("key") == key:
                return tensors["images"]
        except DamagedFileError as error:
            logger.warning("recomputing the held-out reference: %s", error)
    images = final_samples(model, scheduler, space.sampler, num_samples=count, seed=seed, batch_size=batch_size,
                           **conditioning.options(space.guidance_scale))
    save_checked({"images": images}, {"kind": "tadq-search-reference", "key": key}, path)
    return images


def run_search(
    model: nn.Module, scheduler, space: SearchSpace, budget: Budget, out_dir: str | Path, *,
    heldout_trajectories: int = 64, eval_seed: int = 1000, batch_size: int = 128, tie_db: float = TIE_DB,
    progress: bool = True, plan: SearchPlan | None = None,
    on_candidate: Callable[[dict[str, Any]], None] | None = None,
    conditioning: SearchConditions | None = None,
) -> SearchResult:
    """Search ``space`` under ``budget`` for ``model``; caches under ``out_dir/cache`` (resumable).

    Args:
        model: the FP diffusers denoiser (left unchanged).
        scheduler: its training scheduler.
        space: candidates and build settings.
        budget: the cost ceiling; a candidate over it is never scored (over a bit-operations budget, never built).
        out_dir: the search folder (its ``cache/`` holds every finished model and candidate record).
        heldout_trajectories: trajectories of the held-out score.
        eval_seed: the evaluation seed the search must never see (checked against every seed it uses).
        batch_size: sampling batch size of the scoring runs.
        tie_db: scores within this many dB of the best tie; the cheaper candidate wins.
        progress: progress bars.
        plan: ``plan_search``'s result when the caller already has it.
        on_candidate: called with each candidate's record as it finishes.
        conditioning: a conditional model's calibration/held-out conditions, a latent model's decoder (``None``:
            an unconditional pixel model); checked against the model and ``space.guidance_scale`` before any work.
    """
    for name, count in (("heldout_trajectories", heldout_trajectories), ("batch_size", batch_size)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {count!r}")
    if not finite_float(tie_db) or tie_db < 0:  # NaN tied nothing and failed choosing the winner, after all the work
        raise ValueError(f"tie_db must be a finite number of dB >= 0, got {tie_db!r}")
    conditioning = conditioning or SearchConditions()
    check_conditions(model, conditioning.conditions, space.guidance_scale, "tadq recipe")
    plan = plan or plan_search(model, space, budget)
    seeds = {"calibration": space.calibration_seed, **space.correction_seeds(),
             "heldout": heldout_seed(space.calibration_seed), "evaluation": int(eval_seed)}
    check_seeds(calibration_seed=seeds["calibration"], heldout=seeds["heldout"], eval_seed=eval_seed,
                fit_seeds={"correction fit": seeds["fit"], "TCEC selection": seeds["tcec_selection"]})
    out_dir = Path(out_dir)
    cache = out_dir / "cache"
    (cache / "candidates").mkdir(parents=True, exist_ok=True)
    model_key = _digest({"weights": model_fingerprint(model),
                         "scheduler": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
                         **({} if conditioning.key() == SearchConditions().key() else conditioning.key())})
    stats = {"bases_built": 0, "corrections_fitted": 0, "candidates_scored": 0, "candidates_reused": 0,
             "models_loaded": 0}
    builder = _Builder(model, scheduler, plan, cache, model_key, stats, progress, conditioning.conditions)
    reference = None
    # the batch the held-out samples are drawn in moves quantized samples (README: What the batch size changes), so
    # it keys the records and the reference as it keys tadq run's cells; a batch over the count is the same batch
    scoring_batch = min(batch_size, heldout_trajectories)
    records: list[dict[str, Any]] = []
    with progress_bar(plan.candidates, desc="tadq recipe", disable=not progress, unit="candidate") as bar:
        current_base = None
        for candidate in bar:
            show_next(bar, candidate.name)
            if candidate.base_candidate != current_base:  # keep one base's models in memory at a time
                builder.memo.clear()
                current_base = candidate.base_candidate
            recipe = plan.recipes[candidate.name]
            record: dict[str, Any] = {
                "name": candidate.name, "base": candidate.base, "preset": candidate.preset,
                "stack": candidate.stack_name, "fp_layers": candidate.fp_layers,
                "gbitops": plan.gbitops[candidate.name],
                "bytes": None, "score": None, "recipe": config_to_dict(recipe),
            }
            if candidate.name in plan.ruled_out:
                records.append({**record, "status": "over budget", "in_budget": False,
                                "why": plan.ruled_out[candidate.name], "reused": False})
                continue
            score_key = _digest({"build": builder.build_key(candidate), "seed": seeds["heldout"],
                                 "count": heldout_trajectories, "batch": scoring_batch})
            path = cache / "candidates" / f"{candidate.name}.json"
            artefact = str(builder.folder(candidate).relative_to(out_dir))
            reused = _reusable(path, score_key, budget, {**record, "artefact": artefact}) \
                if builder.cached(candidate) else None
            if reused is not None:
                stats["candidates_reused"] += 1
                records.append({**reused, "fp_layers": candidate.fp_layers})  # records written before the axis lack it
                continue
            qmodel = builder.get(candidate)
            nbytes = _artefact_bytes(builder.folder(candidate))
            record.update(bytes=nbytes, build_seconds=builder.timings.get(candidate.name),
                          artefact=artefact, score_key=score_key)
            if not budget.fits(record["gbitops"], nbytes):
                record.update(status="over budget", in_budget=False,
                              why=f"artefact {nbytes} bytes > budget {int(budget.value)}")
            else:
                if reference is None:
                    reference = _reference(model, scheduler, space, seeds["heldout"], heldout_trajectories, cache,
                                           model_key, batch_size, conditioning)
                start = time.perf_counter()
                images = final_samples(qmodel, scheduler, space.sampler, num_samples=heldout_trajectories,
                                       seed=seeds["heldout"], batch_size=batch_size,
                                       **conditioning.options(space.guidance_scale))
                # a NaN score compared as neither better nor worse: it could win
                if nonfinite := nonfinite_count(images):
                    record.update(status="diverged", in_budget=True, score=None,
                                  why=f"{nonfinite} of {len(images)} held-out samples are NaN or Inf",
                                  score_seconds=time.perf_counter() - start)
                else:
                    score = score_samples(images, reference, seeds["heldout"])
                    stats["candidates_scored"] += 1
                    # "why" as a reused record has it: a resumed run's report holds the same keys as a fresh one's
                    record.update(status="scored", in_budget=True, score=score.to_json(), why=None,
                                  score_seconds=time.perf_counter() - start)
            atomic_write_json(record, path)
            records.append({**record, "reused": False})
            if on_candidate is not None:
                on_candidate(record)
    winner, reason = choose_winner(records, budget, tie_db)
    settings = {"heldout_trajectories": heldout_trajectories, "tie_db": tie_db, "batch_size": batch_size,
                "space": {"presets": list(space.presets), "bases": list(space.bases), "stacks": list(space.stacks),
                          "fp_layers": list(space.fp_layers), "sampler": space.sampler.key,
                          "guidance_scale": space.guidance_scale, **conditioning.key(),
                          "calibration_trajectories": space.calibration.num_trajectories,
                          "reconstruction_weight_iters": space.reconstruction.weight_iters,
                          "reconstruction_activation_iters": space.reconstruction.activation_iters,
                          "reconstruction_rounding": space.reconstruction.rounding,
                          "fit_trajectories": space.fit_trajectories, "selection_samples": space.selection_samples},
                "tadq": __version__}
    return SearchResult(records, winner, reason, pareto_front(records, budget), seeds, stats, budget, settings)


_RECORD_STATUSES = ("scored", "diverged", "over budget")


def _record_problem(saved: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Why a saved record whose score key matches still cannot be reused, or ``None``.

    The score key vouches for the settings, not for the rest of the file: an edited or damaged record's recipe
    or artefact path was exported as the winner's (recipe.json of one candidate beside another's model), and
    a score or cost of the wrong type ended the search in a TypeError or KeyError traceback."""
    for name in ("name", "base", "preset", "stack", "fp_layers", "gbitops", "recipe", "artefact"):
        if name == "fp_layers" and name not in saved:
            continue  # records written before the floating-point layers axis lack it
        if json.loads(json.dumps(expected[name])) != saved.get(name):
            return f"its {name!r} is not this candidate's"
    if saved.get("status") not in _RECORD_STATUSES:
        return f"its status {saved.get('status')!r} is none of {_RECORD_STATUSES}"
    if not (finite_float(saved.get("bytes")) and isinstance(saved["bytes"], int) and saved["bytes"] >= 0):
        return f"its bytes {saved.get('bytes')!r} is no byte count"
    score = saved.get("score")
    if (saved["status"] == "scored") != (score is not None):  # a diverged or over-budget candidate has no score
        return f"its status {saved['status']!r} does not go with its score {score!r}"
    if score is None:
        return None
    if not isinstance(score, dict):
        return f"its score {score!r} is not a score"
    for field_ in dataclasses.fields(HeldOutScore):
        value = score.get(field_.name)
        if not (finite_float(value) and (field_.type != "int" or isinstance(value, int))):
            return f"its score's {field_.name} {value!r} is no finite {field_.type}"
    return None


def _reusable(path: Path, score_key: str, budget: Budget, expected: dict[str, Any]) -> dict[str, Any] | None:
    """A finished candidate's record re-judged against this run's budget (another budget may have written it),
    or ``None`` when it must be (re)scored: no record, other settings, scored nowhere yet but within budget, or
    a record that contradicts ``expected`` (the record this run makes for the candidate) or is damaged."""
    if not path.is_file():
        return None
    try:
        saved = read_json_file(path, "candidate record")
    except ValueError:
        return None
    if not isinstance(saved, dict) or saved.get("score_key") != score_key:
        return None
    if problem := _record_problem(saved, expected):
        logger.warning("%s is damaged or was edited (%s); the candidate is scored again", path, problem)
        return None
    fits = budget.fits(saved["gbitops"], saved.get("bytes"))
    if fits and saved.get("status") == "diverged":  # its samples were not finite: not sampled again
        return {**saved, "reused": True}
    if fits and saved.get("score") is not None:
        return {**saved, "status": "scored", "in_budget": True, "why": None, "reused": True}
    if fits is False:  # over this budget: its score (from a larger budget) is not used
        return {**saved, "status": "over budget", "in_budget": False, "score": None, "reused": True,
                "why": f"artefact {saved['bytes']} bytes > budget {int(budget.value)}" if budget.kind == "bytes"
                else f"{saved['gbitops']:.4g} Gbit-ops/sample > budget {budget.value:.4g}"}
    return None


def _cost(record: dict[str, Any], budget: Budget) -> tuple[float, float, str]:
    primary = record["gbitops"] if budget.kind == "gbitops" else record["bytes"]
    secondary = record["bytes"] if budget.kind == "gbitops" else record["gbitops"]
    return (primary, secondary if secondary is not None else float("inf"), record["name"])


def choose_winner(records: list[dict[str, Any]], budget: Budget, tie_db: float = TIE_DB) -> tuple[str, str]:
    """(winner's name, why): the best held-out score within the budget; scores within ``tie_db`` of the best
    tie, and the cheapest of the tied wins (budget measure first, then the other measure, then the name)."""
    scored = [r for r in records if r.get("status") == "scored"]
    if not scored:
        diverged = sum(r.get("status") == "diverged" for r in records)
        raise ValueError(f"no candidate was scored within the budget {budget.describe()}: every built candidate "
                         "was over it" + (f" or diverged ({diverged} gave NaN/Inf samples)" if diverged else ""))
    best = max(scored, key=lambda r: r["score"]["median_psnr"])
    top = best["score"]["median_psnr"]
    tied = [r for r in scored if r["score"]["median_psnr"] >= top - tie_db]
    winner = min(tied, key=lambda r: _cost(r, budget))
    n, seed = winner["score"]["num_trajectories"], winner["score"]["seed"]
    unit = "Gbit-ops/sample" if budget.kind == "gbitops" else "bytes"
    reason = (f"{winner['name']} has the best held-out score within the budget {budget.describe()}: median PSNR vs "
              f"FP {winner['score']['median_psnr']:.2f} dB over {n} held-out trajectories (seed {seed}), at "
              f"{_cost(winner, budget)[0]:.4g} {unit}")
    if winner is not best:
        reason += (f"; {best['name']} scored {top:.2f} dB, within the {tie_db} dB tie margin, and costs more "
                   f"({_cost(best, budget)[0]:.4g} {unit}), so the cheaper one wins")
    others = sorted((r for r in scored if r is not winner and r is not best),
                    key=lambda r: -r["score"]["median_psnr"])
    if others:
        reason += f"; next: {others[0]['name']} at {others[0]['score']['median_psnr']:.2f} dB"
    return winner["name"], reason


def pareto_front(records: list[dict[str, Any]], budget: Budget) -> list[str]:
    """Names of the scored candidates no other scored candidate beats in both cost (the budget's measure) and
    score (cheaper-or-equal and better-or-equal, one of them strictly), cheapest first."""
    scored = [r for r in records if r.get("status") == "scored"]
    front = []
    for r in scored:
        cost, score = _cost(r, budget)[0], r["score"]["median_psnr"]
        dominated = any(_cost(o, budget)[0] <= cost and o["score"]["median_psnr"] >= score
                        and (_cost(o, budget)[0] < cost or o["score"]["median_psnr"] > score) for o in scored)
        if not dominated:
            front.append(r)
    return [r["name"] for r in sorted(front, key=lambda r: _cost(r, budget))]


def export_winner(result: SearchResult, out_dir: str | Path, scheduler,
                  pipeline_source: str | Path | None = None) -> Path:
    """Write ``recipe.json`` (the winner's recipe) and ``model/`` (its artefact, ``tadq.load``-able) into
    ``out_dir``; returns the artefact folder. ``pipeline_source``: the FP pipeline folder of a latent or
    text-to-image model, whose other components (VAE, text encoders...) the artefact keeps, so ``tadq sample`` and
    ``tadq.load_pipeline`` take it.

    A rerun's winner may differ from the one an earlier search left in ``out_dir``: that search's ``recipe.json``
    and report (``REPORT_FILES``, rewritten by ``write_report`` once the evaluation is done) are removed first, and
    ``recipe.json`` is written after ``model/``, so an interrupt during the export or the evaluation (minutes) never
    leaves one search's report or recipe beside another search's winner."""
    out_dir = Path(out_dir)
    record = result.record(result.winner)
    from tadq.recipe import recipe_from_dict

    recipe = recipe_from_dict(record["recipe"])
    for name in ("recipe.json", *REPORT_FILES):
        (out_dir / name).unlink(missing_ok=True)
    target = out_dir / "model"
    qmodel, _ = load(out_dir / record["artefact"])
    save_quantized(qmodel, target, copy.deepcopy(scheduler), overwrite=True, pipeline_source=pipeline_source)
    save_recipe(recipe, out_dir / "recipe.json")  # atomic, through a temp file of this process (not a fixed name)
    return target


def clear_cache(out_dir: str | Path) -> None:
    """Remove a search folder's cache (finished models and records)."""
    shutil.rmtree(Path(out_dir) / "cache", ignore_errors=True)
