"""``tadq recipe --evaluate N``: the winner against every in-budget candidate on the *evaluation* seed.

The README's fixed rows at a preset (naive, Q-Diffusion, Q-Diffusion + PTQD / TAC / TCEC / TAC + TCEC, SVDQuant,
SVDQuant + TAC / TCEC / PTQD) are candidates of the search: those with no layer in float (the older tables quantize
every layer) and those with ``tadq run``'s default floating-point layers (``DEFAULT_FP_LAYERS``, the headline's
setting). Within the budget they were built with the search's settings, so this compares them and the winner at equal
budget and equal build settings, on noise the search never saw. It runs only after the winner is chosen, so nothing
here can influence the choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tadq.api import load
from tadq.config import DEFAULT_FP_LAYERS
from tadq.evaluation import ssim_measurable
from tadq.metrics.image import psnr_per_sample, ssim_per_sample
from tadq.safefiles import nonfinite_count
from tadq.search.score import final_samples
from tadq.search.search import SearchConditions, SearchResult

__all__ = ["README_FP_LAYERS", "README_ROWS", "evaluate_candidates"]

README_ROWS = ("naive", "qdiffusion", "qdiffusion+ptqd", "qdiffusion+tac", "qdiffusion+tcec", "qdiffusion+tac+tcec",
               "svdquant", "svdquant+tac", "svdquant+tcec", "svdquant+ptqd")
"""The (base + stack) names of the README's rows: the main table and the W4A4 SVDQuant table."""


README_FP_LAYERS = ("none", DEFAULT_FP_LAYERS)
"""The floating-point layers keys of the README's rows: every layer quantized, or the headline's default."""


def _is_readme_row(record: dict[str, Any]) -> bool:
    """A README row: its (base + stack) is one of ``README_ROWS`` and its floating-point layers one of
    ``README_FP_LAYERS``."""
    if record.get("fp_layers", "none") not in README_FP_LAYERS:
        return False
    stem = record["base"] if record["stack"] == "none" else f"{record['base']}+{record['stack']}"
    return stem in README_ROWS


def evaluate_candidates(result: SearchResult, model: nn.Module, scheduler, out_dir: str | Path, *,
                        num_samples: int, batch_size: int = 128,
                        conditioning: SearchConditions | None = None) -> dict[str, Any]:
    """Sample the FP model and every in-budget candidate on the evaluation seed; mean and median PSNR, SSIM (``None``
    for images smaller than its window, as in ``tadq run``) and
    final MSE vs FP per candidate (on the decoded images of a latent model), and a summary saying whether the winner
    beats every README row. ``conditioning`` carries the *evaluation* conditions (labels from the evaluation seed,
    the evaluation prompts, disjoint from the search's) and the decoder; the guidance scale is the recipes'.

    A candidate whose samples hold NaN or Inf here gets ``None`` metrics and a ``diverged`` note, and is left out of
    the comparison."""
    seed = result.seeds["evaluation"]
    if seed in {v for k, v in result.seeds.items() if k != "evaluation"}:
        raise ValueError(f"evaluation seed {seed} is one the search used; refusing to evaluate on it")
    from tadq.recipe import recipe_from_dict

    scored = [r for r in result.records if r["status"] == "scored"]
    first = recipe_from_dict(scored[0]["recipe"])
    options = (conditioning or SearchConditions()).options(first.guidance_scale)
    reference = final_samples(model, scheduler, first.sampler, num_samples=num_samples, seed=seed,
                              batch_size=batch_size, **options)
    # SSIM's window needs images of 6 x 6 or more: smaller ones (a tiny pixel model) get no SSIM (None, shown "–"),
    # as in `tadq run`'s table; ssim_per_sample raised after the whole search and every evaluation sample
    measure_ssim = ssim_measurable(reference.shape[1:])
    rows: dict[str, dict[str, Any]] = {}
    for record in scored:
        qmodel, _ = load(Path(out_dir) / record["artefact"])
        images = final_samples(qmodel, scheduler, first.sampler, num_samples=num_samples, seed=seed,
                               batch_size=batch_size, **options)
        row = {"readme_row": _is_readme_row(record), "gbitops": record["gbitops"], "bytes": record["bytes"],
               "heldout_median_psnr": record["score"]["median_psnr"]}
        if nonfinite := nonfinite_count(images):
            # scored finite on the held-out noise, not on this one: its numbers are unmeasurable (null), the row
            # says why, and the other candidates are still compared (PSNR of NaN images raised, after the search)
            rows[record["name"]] = {**row, "mean_psnr": None, "median_psnr": None, "ssim": None, "final_mse": None,
                                    "diverged": f"{nonfinite} of {len(images)} samples hold NaN or Inf"}
            continue
        psnr = psnr_per_sample(images, reference).double()
        rows[record["name"]] = {
            **row, "mean_psnr": float(psnr.mean()), "median_psnr": float(psnr.median()),
            "ssim": float(ssim_per_sample(images, reference).mean()) if measure_ssim else None,
            "final_mse": float((images.clamp(-1, 1) - reference.clamp(-1, 1)).double().square().mean()),
        }
    winner = rows[result.winner]
    fixed = {name: row for name, row in rows.items()
             if row["readme_row"] and name != result.winner and "diverged" not in row}
    if "diverged" in winner:
        summary = (f"the winner {result.winner} diverged on the evaluation seed {seed} ({winner['diverged']}): it "
                   "is not compared with the README rows")
    elif not fixed:
        summary = "no README row other than the winner fits the budget; nothing to compare with"
    else:
        best_name = max(fixed, key=lambda n: fixed[n]["mean_psnr"])
        best = fixed[best_name]
        verb = "beats or equals" if winner["mean_psnr"] >= best["mean_psnr"] else "does NOT beat"
        itself, other = (" (itself a README row)", " other") if winner["readme_row"] else ("", "")
        summary = (f"the winner {result.winner}{itself} {verb} the best{other} README row within the budget, "
                   f"{best_name}: mean "
                   f"PSNR vs FP {winner['mean_psnr']:.2f} vs {best['mean_psnr']:.2f} dB (median "
                   f"{winner['median_psnr']:.2f} vs {best['median_psnr']:.2f}) on {num_samples} samples of the "
                   f"evaluation seed {seed}")
    return {"seed": seed, "num_samples": num_samples, "rows": rows, "summary": summary}
