"""Named correction stacks for ``tadq quantize --correct`` and the README's rows: one table, so a flag and a row
with the same name build the same configs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tadq.corrections import CorrectionConfig, PTQDConfig, TACConfig, TCECConfig

__all__ = ["CORRECTION_NAMES", "correction_configs"]

CORRECTION_NAMES: dict[str, Callable[[int], CorrectionConfig]] = {
    "ptqd": lambda seed: PTQDConfig(seed=seed),
    "ptqd-select": lambda seed: PTQDConfig(seed=seed, select=True),  # CNC/BC kept only if they help on held-out noise
    # the same guard scored by mean log MSE per trajectory (mean PSNR's ranking) instead of the pooled MSE
    "ptqd-select-log": lambda seed: PTQDConfig(seed=seed, select=True, selection_score="log_mse"),
    "tac": lambda seed: TACConfig(seed=seed),
    "ibc": lambda seed: TACConfig(ner=False, seed=seed),  # TAC's input bias correction alone
    "ner": lambda seed: TACConfig(ibc=False, seed=seed),  # TAC's noise estimation reconstruction alone
    "tac-select": lambda seed: TACConfig(seed=seed, select_ner=True),  # NER kept only if it helps on held-out noise
    "tcec": lambda seed: TCECConfig(seed=seed),
}
"""Correction name → config with the default settings, fitted with noise ``seed`` (a calibration seed)."""


def correction_configs(names: Sequence[str], seed: int) -> tuple[CorrectionConfig, ...]:
    """Configs of ``names`` in application order; ``ValueError`` naming an unknown one."""
    unknown = [name for name in names if name not in CORRECTION_NAMES]
    if unknown:
        raise ValueError(f"unknown corrections {unknown}; choose from {sorted(CORRECTION_NAMES)} (in application "
                         "order, e.g. tac,tcec)")
    return tuple(CORRECTION_NAMES[name](seed) for name in names)
