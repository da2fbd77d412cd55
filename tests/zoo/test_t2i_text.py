"""The text-to-image digits model's prompts and tokenizer: built offline, round-trip, and refuse long prompts."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the text-to-image model needs transformers (CLIP)")

from tadq.zoo.t2i_prompts import (
    CALIBRATION_PROMPTS,
    DIGIT_WORDS,
    EVALUATION_PROMPTS,
    TRAINING_PROMPTS,
    digit_of,
    prompt_words,
)
from tadq.zoo.t2i_text import EOS, build_tokenizer, check_prompt, learn_merges


def test_calibration_and_evaluation_prompts_are_disjoint_cover_all_digits_and_are_trained_on():
    assert not set(CALIBRATION_PROMPTS) & set(EVALUATION_PROMPTS)
    assert len(set(CALIBRATION_PROMPTS)) == len(CALIBRATION_PROMPTS) >= 20
    assert len(set(EVALUATION_PROMPTS)) == len(EVALUATION_PROMPTS) >= 20
    for prompts in (CALIBRATION_PROMPTS, EVALUATION_PROMPTS):
        assert sorted({digit_of(p) for p in prompts}) == list(range(10))
        assert set(prompts) <= set(TRAINING_PROMPTS)
    assert len(set(TRAINING_PROMPTS)) == len(TRAINING_PROMPTS)


def test_digit_of_reads_words_and_numerals_and_refuses_ambiguity():
    assert digit_of("a handwritten seven") == 7
    assert digit_of("the digit 7") == 7
    assert digit_of("A Picture of the number ZERO") == 0
    with pytest.raises(ValueError, match="no digit"):
        digit_of("a handwritten digit")
    with pytest.raises(ValueError, match="several digits"):
        digit_of("a seven or an 8")
    assert digit_of("seven 7") == 7  # the same digit twice is not ambiguous


def test_every_training_word_is_one_token_and_prompts_round_trip():
    tokenizer = build_tokenizer(16)
    vocab = tokenizer.get_vocab()
    for prompt in TRAINING_PROMPTS:
        ids = check_prompt(tokenizer, prompt)
        words = prompt_words(prompt)
        assert len(ids) == len(words) + 2  # start, one token per word, end
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == prompt
    assert all(word + "</w>" in vocab for word in DIGIT_WORDS)
    padded = tokenizer("the digit 7", padding="max_length", max_length=16)["input_ids"]
    assert len(padded) == 16 and padded[-1] == vocab[EOS]


def test_an_unseen_word_falls_back_to_known_pieces_not_to_unknown():
    tokenizer = build_tokenizer(16)
    ids = check_prompt(tokenizer, "a sketch of a seven")
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a sketch of a seven"


def test_a_prompt_longer_than_the_model_reads_is_refused_with_a_clear_message():
    tokenizer = build_tokenizer(8)
    check_prompt(tokenizer, "a picture of the number seven")  # 6 words + 2 = 8 tokens: fits exactly
    with pytest.raises(ValueError, match="at most 8"):
        check_prompt(tokenizer, "a picture of the number seven again")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        check_prompt(tokenizer, "the digit 7!")


def test_merges_are_deterministic_and_build_whole_words():
    words = ["seven", "seventeen", "seven", "six"]
    assert learn_merges(words) == learn_merges(list(words))
    merged = {a + b for a, b in learn_merges(words)}
    assert {"seven</w>", "seventeen</w>", "six</w>"} <= merged
