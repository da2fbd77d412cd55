"""The prompts of the shipped text-to-image digits model: training templates and the quantization prompt sets.

One place defines every prompt so that training, calibration and evaluation can never drift apart. The model is
trained on every template; quantization work uses two disjoint template subsets, so a quantized model is calibrated
on one phrasing and measured on another (no prompt string is in both sets):

- ``CALIBRATION_PROMPTS``: 4 templates × 10 digits, for recording calibration trajectories;
- ``EVALUATION_PROMPTS``: 4 other templates × 10 digits, for measuring quality (prompt agreement, FD-digits).

``digit_of(prompt)`` reads the digit a prompt asks for, which is the label the digit classifier must read back.
"""

from __future__ import annotations

import re

__all__ = ["CALIBRATION_PROMPTS", "CALIBRATION_TEMPLATES", "DIGIT_WORDS", "EVALUATION_PROMPTS",
           "EVALUATION_TEMPLATES", "TEMPLATES", "TRAINING_PROMPTS", "digit_of", "prompt_words", "prompts_for"]

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit as a word ("seven"), {n}: as a numeral ("7")
CALIBRATION_TEMPLATES: tuple[str, ...] = (
    "a handwritten {w}",
    "the number {w}",
    "a drawing of the digit {n}",
    "the numeral {n}",
)
EVALUATION_TEMPLATES: tuple[str, ...] = (
    "the digit {n}",
    "a picture of the number {w}",
    "a handwritten digit {w}",
    "an image of a {w}",
)
# seen in training only: the model also learns the bare word and a few more phrasings
_TRAINING_ONLY_TEMPLATES: tuple[str, ...] = (
    "{w}",
    "digit {n}",
    "a scanned {w}",
    "a small grey {w}",
)
TEMPLATES: tuple[str, ...] = CALIBRATION_TEMPLATES + EVALUATION_TEMPLATES + _TRAINING_ONLY_TEMPLATES


def prompts_for(templates: tuple[str, ...]) -> tuple[str, ...]:
    """Every template filled with every digit, digit-major (digit 0's prompts first), so order is fixed."""
    return tuple(t.format(w=DIGIT_WORDS[d], n=str(d)) for d in range(10) for t in templates)


TRAINING_PROMPTS: tuple[str, ...] = prompts_for(TEMPLATES)
CALIBRATION_PROMPTS: tuple[str, ...] = prompts_for(CALIBRATION_TEMPLATES)
EVALUATION_PROMPTS: tuple[str, ...] = prompts_for(EVALUATION_TEMPLATES)

_WORD = re.compile(r"[a-z]+|[0-9]")


def prompt_words(prompt: str) -> list[str]:
    """Lower-case words and single numerals of a prompt (the units the tokenizer's vocabulary is built from)."""
    return _WORD.findall(prompt.lower())


def digit_of(prompt: str) -> int:
    """The digit (0–9) a prompt asks for; ValueError when it names none or two different digits."""
    found = set()
    for word in prompt_words(prompt):
        if word in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(word))
        elif word.isdigit():
            found.add(int(word))
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ValueError(f"prompt {prompt!r} names {what}; a digits prompt names exactly one (a word or a numeral)")
    return found.pop()
