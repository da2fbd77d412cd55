"""``tfmq_measure paired``: rows paired with the reference row of their own bit-width, or with one named row."""

from __future__ import annotations

import pytest
import torch

from tadq.experiments.tfmq_measure import merged_cells, paired_rows


def _cell(name: str, bits: str, images: torch.Tensor) -> dict:
    return {"name": name, "bits": bits, "images": images}


def test_each_preset_is_paired_with_its_own_reference_and_keyed_by_bits():
    generator = torch.Generator().manual_seed(0)
    fp = torch.rand(16, 1, 4, 4, generator=generator) * 2 - 1

    def noisy(scale: float) -> torch.Tensor:
        return fp + scale * torch.randn(fp.shape, generator=generator)

    cells = [_cell("FP", "W32A32", fp), _cell("ref", "W8A8", noisy(0.01)), _cell("peer", "W8A8", noisy(0.02)),
             _cell("ref", "W4A8", noisy(0.1)), _cell("peer", "W4A8", noisy(0.05))]
    results = paired_rows(cells, "ref")
    assert sorted(results) == ["peer W4A8", "peer W8A8", "ref W4A8", "ref W8A8"]
    assert results["ref W8A8"]["difference"] == 0.0
    assert results["peer W8A8"]["difference"] < 0 < results["peer W4A8"]["difference"]  # finer noise, higher PSNR
    single = paired_rows(cells[:3], "ref")
    assert sorted(single) == ["peer", "ref"]  # one bit-width: the names alone, as before
    with pytest.raises(ValueError, match="no 'ref' row at W4A8"):
        paired_rows([*cells[:3], _cell("peer", "W4A8", fp)], "ref")


def test_two_folders_pair_when_their_fp_samples_are_identical():
    generator = torch.Generator().manual_seed(1)
    fp = torch.rand(8, 1, 4, 4, generator=generator) * 2 - 1
    first = [_cell("FP", "W32A32", fp), _cell("ref", "W8A8", fp + 0.01)]
    second = [_cell("FP", "W32A32", fp.clone()), _cell("other", "W8A8", fp + 0.02)]
    results = paired_rows(merged_cells([first, second]), "ref")
    assert sorted(results) == ["other", "ref"] and results["other"]["difference"] < 0
    moved = [_cell("FP", "W32A32", fp + 1e-3), _cell("other", "W8A8", fp + 0.02)]
    with pytest.raises(ValueError, match="not drawn from the same noise"):
        merged_cells([first, moved])


def test_a_name_at_bits_reference_pairs_every_row_with_that_one_row():
    generator = torch.Generator().manual_seed(2)
    fp = torch.rand(16, 1, 4, 4, generator=generator) * 2 - 1
    ref = fp + 0.01 * torch.randn(fp.shape, generator=generator)
    cells = [_cell("FP", "W32A32", fp), _cell("ref", "W8A8", ref),
             _cell("ref", "W8A8-WSYM", fp + 0.03 * torch.randn(fp.shape, generator=generator))]
    results = paired_rows(cells, "ref@W8A8")
    assert results["ref W8A8"]["difference"] == 0.0
    assert results["ref W8A8-WSYM"]["difference"] < 0  # coarser noise than the W8A8 row it is paired with
    with pytest.raises(ValueError, match="no row 'ref' at W4A8"):
        paired_rows(cells, "ref@W4A8")
