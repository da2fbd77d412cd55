"""Automatic recipe search (``tadq recipe``): the best base × preset × correction stack × floating-point layers under a
budget, chosen on held-out calibration noise (docs/recipe_search.md).

``space`` (candidates and their cost), ``score`` (the robust held-out score and the seed rules), ``search`` (the
loop with reuse of fitted pieces and resumable cache), ``report`` (JSON, Markdown, Pareto plot) and ``evaluate``
(the winner against the fixed rows on the evaluation seed).
"""

from tadq.search.score import HELDOUT_SEED_OFFSET, HeldOutScore, check_seeds, heldout_seed
from tadq.search.search import (
    SearchConditions,
    SearchPlan,
    SearchResult,
    choose_winner,
    export_winner,
    plan_search,
    run_search,
)
from tadq.search.space import BASES, STACKS, Budget, Candidate, SearchSpace, gbitops_per_sample

__all__ = [
    "BASES", "STACKS", "Budget", "Candidate", "SearchSpace", "gbitops_per_sample", "HELDOUT_SEED_OFFSET",
    "HeldOutScore", "check_seeds", "heldout_seed", "SearchPlan", "SearchResult", "choose_winner", "export_winner",
    "plan_search", "run_search", "SearchConditions",
]
