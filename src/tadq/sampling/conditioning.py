"""The conditioning seam: what a denoiser is told besides (x, t), per sample, and its unconditional counterpart.

A denoiser is called as ``denoiser(x, t, cond)``; ``cond`` is ``None`` for an unconditional model or a
``Conditioning`` whose rows line up with the rows of x. Classifier-free guidance needs the unconditional branch
(``Conditioning.unconditional``: a null class, an empty-prompt embedding), which the sampling walker batches
with the conditional one in a single call.

Per-sample conditions come from a ``ConditionSource``: a deterministic function of (seed, sample index) (random
labels drawn from a generator keyed by both, on their own noise stream) or of an explicit list, so a sample's
conditions, like its noise, do not depend on the batch or on how many workers share the run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from tadq.sampling.noise import LABEL_STREAM, sample_generator

__all__ = ["ClassLabels", "Conditioning", "ConditionSource", "ConditioningList", "RandomClassLabels",
           "conditions_for"]

_BATCHED = ("class_labels", "encoder_hidden_states", "pooled_embeds", "attention_mask", "unconditional_rows")
# a marker of rows, not a model input: adapters never see it as one (``describe`` leaves it out)
_MARKERS = ("unconditional_rows",)


def _branch_marks(unconditional: int, conditional: int, device: torch.device) -> Tensor:
    """[True × unconditional | False × conditional]: the row markers of a guidance batch."""
    return torch.cat([torch.ones(unconditional, dtype=torch.bool, device=device),
                      torch.zeros(conditional, dtype=torch.bool, device=device)])


def _rows(value: Tensor | None, index: Tensor | slice) -> Tensor | None:
    return None if value is None else value[index]


@dataclass(frozen=True)
class Conditioning:
    """Per-sample conditioning, dim 0 is the sample; ``unconditional`` holds the null branch for guidance.

    Args:
        class_labels: (N,) long class indices (class-conditional UNets).
        encoder_hidden_states: (N, L, D) text embeddings (cross-attention).
        pooled_embeds: (N, D') pooled text embeddings.
        attention_mask: (N, L) encoder attention mask.
        added_cond_kwargs: Further per-sample model inputs (e.g. SDXL's ``time_ids``), each (N, ...).
        unconditional: The same fields for the unconditional branch (no nested ``unconditional``).
        unconditional_rows: (N,) bool, which rows hold the unconditional branch, when both branches are stacked
            in one batch (``guidance_batch``, ``stacked_branches``); lets a quantized model give that branch its
            own activation ranges (``QuantConfig.branch_ranges``). Not a model input.
    """

    class_labels: Tensor | None = None
    encoder_hidden_states: Tensor | None = None
    pooled_embeds: Tensor | None = None
    attention_mask: Tensor | None = None
    unconditional_rows: Tensor | None = None
    added_cond_kwargs: Mapping[str, Tensor] = field(default_factory=dict)
    unconditional: Conditioning | None = None

    def __post_init__(self) -> None:
        sizes = {name: int(value.shape[0]) for name, value in self._tensors().items()}
        if not sizes:
            raise ValueError("a Conditioning needs at least one tensor; pass cond=None for an unconditional model")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every conditioning tensor must have one row per sample, got {sizes}")
        if self.unconditional is not None:
            if self.unconditional.unconditional is not None:
                raise ValueError("Conditioning.unconditional must not have an unconditional branch of its own")
            if self.unconditional.batch_size != self.batch_size:
                raise ValueError(f"the unconditional branch has {self.unconditional.batch_size} rows, the "
                                 f"conditional one {self.batch_size}")
            # both branches go through the network in one batch (as diffusers' pipelines require, a negative
            # prompt's embeddings must have the prompt's token count and width): refused here, not in torch.cat
            mine, theirs = self._tensors(), self.unconditional._tensors()
            differing = {name: (tuple(mine[name].shape[1:]), tuple(theirs[name].shape[1:])) for name in
                         sorted(set(mine) & set(theirs)) if mine[name].shape[1:] != theirs[name].shape[1:]}
            if differing:
                raise ValueError("the guidance branches must have equal shapes per sample, but (conditional, "
                                 f"unconditional) differ: {differing}; encode the negative prompt padded to the "
                                 "prompt's length")

    def _tensors(self) -> dict[str, Tensor]:
        named = {name: getattr(self, name) for name in _BATCHED if getattr(self, name) is not None}
        return {**named, **{f"added_cond_kwargs.{k}": v for k, v in self.added_cond_kwargs.items()}}

    def _device(self) -> torch.device:
        return next(iter(self._tensors().values())).device

    @property
    def batch_size(self) -> int:
        """N, the number of samples this conditioning is for."""
        return int(next(iter(self._tensors().values())).shape[0])

    def rows(self, index: Tensor | slice | Sequence[int]) -> Conditioning:
        """The conditioning of the selected samples (both branches)."""
        if not isinstance(index, (Tensor, slice)):
            index = torch.as_tensor(list(index), dtype=torch.long)
        return self._map(lambda value: value[index])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        """On ``device``; floating tensors also in ``dtype`` (the model's), integer labels and masks unchanged."""

        def move(value: Tensor) -> Tensor:
            target = dtype if dtype is not None and value.is_floating_point() else value.dtype
            return value.to(device=device, dtype=target)

        return self._map(move)

    def _map(self, function) -> Conditioning:
        changes: dict[str, Any] = {name: function(getattr(self, name)) for name in _BATCHED
                                   if getattr(self, name) is not None}
        changes["added_cond_kwargs"] = {k: function(v) for k, v in self.added_cond_kwargs.items()}
        if self.unconditional is not None:
            changes["unconditional"] = self.unconditional._map(function)
        return replace(self, **changes)

    def conditional_only(self) -> Conditioning:
        """This branch without its unconditional counterpart."""
        return replace(self, unconditional=None)

    def guidance_batch(self) -> Conditioning:
        """[unconditional | conditional] stacked on dim 0: one denoiser call evaluates both guidance branches."""
        if self.unconditional is None:
            raise ValueError("classifier-free guidance needs an unconditional branch (a null class or an empty "
                             "prompt) but this conditioning has none; sample with guidance_scale=1, or give the "
                             "condition source its null class")
        stacked = Conditioning.cat([self.unconditional, self.conditional_only()])
        marks = _branch_marks(self.unconditional.batch_size, self.batch_size, self._device())
        return replace(stacked, unconditional_rows=marks)

    def stacked_branches(self) -> Conditioning:
        """[conditional | unconditional] stacked on dim 0 with the rows marked (the calibration set's layout)."""
        if self.unconditional is None:
            raise ValueError("this conditioning has no unconditional branch to stack")
        stacked = Conditioning.cat([self.conditional_only(), self.unconditional])
        marks = _branch_marks(self.unconditional.batch_size, self.batch_size, self._device()).flip(0)
        return replace(stacked, unconditional_rows=marks)

    def without_markers(self) -> Conditioning:
        """The model inputs only (row markers dropped), e.g. for one branch's rows passed to a network."""
        return replace(self, **dict.fromkeys(_MARKERS))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate conditionings on dim 0 (every part must carry the same fields)."""
        first = parts[0]
        layout = [(name, getattr(first, name) is None) for name in _BATCHED]
        for part in parts[1:]:
            if [(name, getattr(part, name) is None) for name in _BATCHED] != layout or \
                    set(part.added_cond_kwargs) != set(first.added_cond_kwargs):
                fields = [sorted(p._tensors()) for p in (first, part)]
                raise ValueError(f"cannot concatenate conditionings with different fields: {fields[0]} and "
                                 f"{fields[1]} (the guidance branches too must carry the same fields)")
        changes: dict[str, Any] = {name: torch.cat([getattr(p, name) for p in parts]) for name, absent in layout
                                   if not absent}
        changes["added_cond_kwargs"] = {k: torch.cat([p.added_cond_kwargs[k] for p in parts])
                                        for k in first.added_cond_kwargs}
        uncond = [p.unconditional for p in parts]
        if all(u is not None for u in uncond):
            changes["unconditional"] = Conditioning.cat(uncond)  # type: ignore[arg-type]
        elif any(u is not None for u in uncond):
            raise ValueError("cannot concatenate conditionings where only some have an unconditional branch")
        else:
            changes["unconditional"] = None
        return replace(first, **changes)

    def to_tensors(self, prefix: str = "cond.") -> dict[str, Tensor]:
        """Flat name → tensor dict (for safetensors files); ``from_tensors`` reads it back."""
        flat = {f"{prefix}{name}": value.contiguous() for name, value in self._tensors().items()}
        if self.unconditional is not None:
            flat.update(self.unconditional.to_tensors(f"{prefix}unconditional."))
        return flat

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], prefix: str = "cond.") -> Conditioning | None:
        """The conditioning written by ``to_tensors`` (``None`` when the file holds none)."""
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not mine:
            return None
        uncond = cls.from_tensors(tensors, f"{prefix}unconditional.")
        direct = {name: mine[name] for name in _BATCHED if name in mine}
        added = {k.split(".", 1)[1]: v for k, v in mine.items() if k.startswith("added_cond_kwargs.")}
        return cls(**direct, added_cond_kwargs=added, unconditional=uncond)

    def describe(self) -> dict[str, Any]:
        """Field → shape, for error messages and run keys."""
        shapes = {name: list(value.shape) for name, value in self._tensors().items() if name not in _MARKERS}
        return {**shapes, "unconditional": None if self.unconditional is None else self.unconditional.describe()}


@runtime_checkable
class ConditionSource(Protocol):
    """Per-sample conditions as a function of (seed, sample index) only; ``key`` names it in run keys."""

    def __call__(self, seed: int, indices: Sequence[int]) -> Conditioning: ...

    @property
    def key(self) -> str: ...


def _check_null(null_class: int | None, labels_below: int) -> None:
    if null_class is None:
        return
    if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 0:
        raise ValueError(f"null_class must be a non-negative int or None, got {null_class!r}")
    if null_class < labels_below:
        raise ValueError(f"null_class={null_class} is also a real label (labels lie in [0, {labels_below}))")


def _labels_conditioning(labels: list[int], null_class: int | None) -> Conditioning:
    tensor = torch.tensor(labels, dtype=torch.long)  # (N,) on the CPU; the walker moves it
    uncond = None if null_class is None else Conditioning(class_labels=torch.full_like(tensor, null_class))
    return Conditioning(class_labels=tensor, unconditional=uncond)


@dataclass(frozen=True)
class RandomClassLabels:
    """Label of sample i drawn uniformly from [0, num_classes) by a generator keyed by (seed, i, label stream).

    Args:
        num_classes: K real classes.
        null_class: The model's "no class" label used for the unconditional branch (``None``: the model has
            none, and guidance is refused).
    """

    num_classes: int
    null_class: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        _check_null(self.null_class, self.num_classes)

    def __call__(self, seed: int, indices: Sequence[int]) -> Conditioning:
        labels = [int(torch.randint(self.num_classes, (1,), generator=sample_generator(seed, i, LABEL_STREAM)))
                  for i in indices]
        return _labels_conditioning(labels, self.null_class)

    @property
    def key(self) -> str:
        return f"random-labels-{self.num_classes}-null{self.null_class}"


@dataclass(frozen=True)
class ClassLabels:
    """Explicit labels: sample i gets ``labels[i]`` (an index beyond the list raises)."""

    labels: tuple[int, ...]
    null_class: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(int(label) for label in self.labels))
        if not self.labels or min(self.labels) < 0:
            raise ValueError(f"labels must be a non-empty list of non-negative ints, got {self.labels!r}")
        if self.null_class is not None and self.null_class in self.labels:
            raise ValueError(f"null_class={self.null_class} is also one of the labels")
        _check_null(self.null_class, 0)

    def __call__(self, seed: int, indices: Sequence[int]) -> Conditioning:
        return _labels_conditioning([self.labels[_checked(i, len(self.labels))] for i in indices], self.null_class)

    def __len__(self) -> int:
        """The number of labels: sample indices 0..len-1 have one, no other does."""
        return len(self.labels)

    def check_indices(self, indices: Sequence[int]) -> None:
        """Refuse, before any sampling, indices beyond the labels: fewer labels than samples raised an IndexError
        at the first batch past them, after the batches before it (or calibration's walks) had run."""
        _check_list_indices(indices, len(self), "ClassLabels holds {count} labels")

    @property
    def key(self) -> str:
        return f"labels-{list(self.labels)}-null{self.null_class}"


@dataclass(frozen=True)
class ConditioningList:
    """Explicit per-sample conditioning (e.g. encoded prompts): sample i gets row i of ``rows``."""

    rows: Conditioning
    name: str = "explicit"

    def __post_init__(self) -> None:  # a ConditioningList of a ConditioningList failed later, inside a cache key
        if not isinstance(self.rows, Conditioning):
            raise TypeError(f"ConditioningList takes a Conditioning (one row per sample), got "
                            f"{type(self.rows).__name__}")
        if not isinstance(self.name, str):
            raise TypeError(f"ConditioningList.name must be a str, got {type(self.name).__name__}")

    def __call__(self, seed: int, indices: Sequence[int]) -> Conditioning:
        return self.rows.rows([_checked(i, self.rows.batch_size) for i in indices])

    def __len__(self) -> int:
        """The number of rows: sample indices 0..len-1 have a condition, no other does."""
        return self.rows.batch_size

    def check_indices(self, indices: Sequence[int]) -> None:
        """Refuse, before any sampling, indices beyond the list (a run would fail at its first batch past them)."""
        _check_list_indices(indices, len(self), "the condition list holds {count} rows")

    @property
    def key(self) -> str:
        """Name, shapes and a SHA-256 of the rows' bytes: two lists differing in any value have different keys."""
        digest = hashlib.sha256()
        for name, value in sorted(self.rows.to_tensors().items()):
            digest.update(name.encode())
            # raw bytes through uint8 (numpy's bytes for every dtype it has): bfloat16, which numpy lacks, too
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return f"{self.name}-{self.rows.describe()}-{digest.hexdigest()[:16]}"


def _check_list_indices(indices: Sequence[int], count: int, holds: str) -> None:
    """Refuse indices past the end of a finite per-sample list (``holds`` names it, with ``{count}``)."""
    if len(indices) and max(indices) >= count:
        raise ValueError(f"{len(indices)} samples up to index {max(indices)}, but {holds.format(count=count)} (one "
                         f"per sample): give at least {max(indices) + 1}, or sample fewer")


def _checked(index: int, length: int) -> int:
    if not 0 <= int(index) < length:
        raise IndexError(f"sample index {index} has no condition: the list holds {length}")
    return int(index)


def conditions_for(source: ConditionSource | None, seed: int, indices: Sequence[int]) -> Conditioning | None:
    """The conditioning of ``indices`` (``None`` for an unconditional run), checked to have one row per sample."""
    if source is None:
        return None
    if not isinstance(source, ConditionSource):
        raise TypeError(f"conditions must be a ConditionSource (e.g. RandomClassLabels), got {type(source).__name__}")
    cond = source(seed, indices)
    if cond.batch_size != len(indices):
        raise ValueError(f"the condition source gave {cond.batch_size} rows for {len(indices)} samples")
    return cond

