"""The text side of the text-to-image digits model: a CLIP tokenizer built offline from the prompt words, and a
tiny ``CLIPTextModel``.

Nothing is downloaded: the byte-pair merges are learnt here from the words of ``TRAINING_PROMPTS`` (classic BPE:
repeatedly merge the most frequent adjacent pair until every word is one symbol), so every training word is one
token and any other lower-case word still tokenizes into known letters. The vocabulary is the two CLIP special
tokens, the letters and numerals (each also as a word end, ``a</w>``), and every merged symbol.
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tadq.zoo.t2i_prompts import TRAINING_PROMPTS, prompt_words

__all__ = ["BOS", "EOS", "build_text_encoder", "build_tokenizer", "check_prompt", "learn_merges"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make each word of ``words`` a single symbol; ties broken by the pair's text (deterministic).

    Applying merges in rank order (what CLIP's BPE does) replays exactly this sequence on a training word, because a
    merge can only involve symbols created by earlier merges.
    """
    counts = Counter(words)
    segmented = {w: tuple(w[:-1]) + (w[-1] + END,) for w in counts}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in segmented.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += counts[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in segmented.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[word] = tuple(merged)


def build_tokenizer(max_length: int = 16, prompts: tuple[str, ...] = TRAINING_PROMPTS) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose vocabulary and merges come from the words of ``prompts`` (padding = end token)."""
    words = [w for p in prompts for w in prompt_words(p)]
    merges = learn_merges(words)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for char in ALPHABET:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + END, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, bos_token=BOS, eos_token=EOS,
                         unk_token=EOS, pad_token=EOS)


def check_prompt(tokenizer: CLIPTokenizer, prompt: str) -> list[int]:
    """The token ids of ``prompt``; ValueError if it is longer than the model reads or has characters it cannot.

    The diffusers pipeline silently truncates a long prompt (and maps unknown characters to the end token), which
    would change the prompt the model draws without telling anyone; this check says so instead.
    """
    ids = tokenizer(prompt)["input_ids"]
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        raise ValueError(f"prompt {prompt!r} is {len(ids)} tokens with the start and end tokens; this model reads at "
                         f"most {limit} (about {limit - 2} words): shorten it")
    if tokenizer.unk_token_id in ids[1:-1]:
        raise ValueError(f"prompt {prompt!r} has characters outside the model's vocabulary (lower-case letters a-z, "
                         "numerals 0-9, spaces); remove them")
    return ids


def build_text_encoder(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 2,
                       max_length: int = 16) -> CLIPTextModel:
    """A tiny CLIP text transformer (causal, final layer norm) whose last hidden states condition the UNet."""
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_length, projection_dim=hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)
