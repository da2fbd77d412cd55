"""``tfmq_measure paired``: rows paired with the reference row of their own bit-width, or with one named row."""

from __future__ import annotations

import math

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


def _save_run(folder, cells: list[dict], key_prefix: str, report: bool) -> None:
    """``cells`` saved as a ``tadq run`` folder's cells (keys ``<prefix><index>``), with its results.json naming them
    when ``report``."""
    import json

    from tadq.experiments.run import CELL_SUFFIX, save_cell

    (folder / "cells").mkdir(parents=True, exist_ok=True)
    keys = []
    for index, cell in enumerate(cells):
        key = f"{key_prefix}{index}"
        keys.append(key)
        save_cell({**cell, "key": key, "states": torch.zeros(1), "setup_s": 0.0, "sampling_s": 0.0, "settings": {},
                   "extras": {}, "components": None}, folder / "cells" / f"{index:02d}-{key}{CELL_SUFFIX}")
    if report:
        (folder / "results.json").write_text(json.dumps({"rows": [], "cell_keys": keys}))


def test_a_folder_rerun_with_other_settings_pairs_only_its_report_s_cells(tmp_path):
    """A rerun into the same folder (another evaluation seed) keeps the first run's cells beside its own: every file
    in cells/ was paired, the first run's FP stood for both and each row came from whichever file was read last."""
    from tadq.experiments.tfmq_measure import paired_psnr

    generator = torch.Generator().manual_seed(3)
    old_fp, new_fp = (torch.rand(8, 1, 4, 4, generator=generator) * 2 - 1 for _ in range(2))
    first = [_cell("FP", "W32A32", old_fp), _cell("ref", "W8A8", old_fp + 0.3), _cell("peer", "W8A8", old_fp)]
    second = [_cell("FP", "W32A32", new_fp), _cell("ref", "W8A8", new_fp + 0.01), _cell("peer", "W8A8", new_fp + 0.02)]
    _save_run(tmp_path, first, "a", report=False)
    _save_run(tmp_path, second, "b", report=True)  # written later: results.json is the second run's
    results = paired_psnr(str(tmp_path), "ref")
    expected = paired_rows(second, "ref")
    assert results == expected and results["peer"]["difference"] < 0  # the second run's rows alone
    (tmp_path / "results.json").unlink()  # a folder whose report does not say which cells are its own
    with pytest.raises(ValueError, match="holds the FP W32A32 row twice"):
        paired_psnr(str(tmp_path), "ref")


def test_no_fp_cell_is_refused_by_name():
    with pytest.raises(ValueError, match="no FP cell"):
        paired_rows([_cell("ref", "W8A8", torch.zeros(2, 1, 4, 4))], "ref")


def test_one_sample_has_an_undefined_interval_and_identical_samples_a_zero_one(capsys, tmp_path):
    """n = 1: torch's std warned and gave NaN, printed as the non-JSON token NaN; identical rows: 0 ± 0."""
    import json
    import warnings

    from tadq.experiments.tfmq_measure import main, paired_difference

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        difference, interval = paired_difference(torch.tensor([30.0]), torch.tensor([29.0]))
    assert difference == 1.0 and math.isnan(interval)
    assert paired_difference(torch.full((4,), 30.0), torch.full((4,), 30.0)) == (0.0, 0.0)
    fp = torch.zeros(1, 1, 4, 4)
    _save_run(tmp_path, [_cell("FP", "W32A32", fp), _cell("ref", "W8A8", fp + 0.1)], "k", report=True)
    main(["paired", str(tmp_path), "ref"])
    printed = json.loads(capsys.readouterr().out, parse_constant=lambda token: pytest.fail(f"{token} in the JSON"))
    assert printed["ref"]["interval"] is None and printed["ref"]["difference"] == 0.0


def test_the_command_line_refuses_a_bad_folder_in_one_line(tmp_path):
    """``python -m tadq.experiments.tfmq_measure paired DIR`` on a folder without cells, or on folders drawn from
    other noise, printed a ValueError traceback; it exits with the message alone."""
    from tadq.experiments.tfmq_measure import main

    with pytest.raises(SystemExit) as exit_info:
        main(["paired", str(tmp_path)])
    assert str(exit_info.value).startswith("error: ") and "holds no run cells" in str(exit_info.value)
    first, second = tmp_path / "a", tmp_path / "b"
    fp = torch.zeros(2, 1, 4, 4)
    _save_run(first, [_cell("FP", "W32A32", fp), _cell("ref", "W8A8", fp + 0.1)], "k", report=True)
    _save_run(second, [_cell("FP", "W32A32", fp + 1), _cell("ref", "W8A8", fp + 0.2)], "k", report=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["paired", f"{first},{second}", "ref"])
    assert str(exit_info.value).startswith("error: ") and "FP samples differ" in str(exit_info.value)


def test_a_diverged_row_is_reported_and_the_other_rows_are_still_paired():
    """tadq run reports a diverged row (NaN samples) as NaN and measures the rest; pairing its folder raised on the
    row's PSNR and gave nothing for any row, naming none. Now that row, and any row paired with it, has NaN numbers
    (null in the printed JSON) and says why; every other row is paired as before."""
    from tadq.report import dumps_json

    generator = torch.Generator().manual_seed(3)
    fp = torch.rand(8, 1, 4, 4, generator=generator) * 2 - 1
    broken = fp.clone()
    broken[2, 0, 1, 1] = float("nan")
    cells = [_cell("FP", "W32A32", fp), _cell("ref", "W8A8", fp + 0.01), _cell("peer", "W8A8", fp + 0.02),
             _cell("ref", "W4A4", broken), _cell("peer", "W4A4", fp + 0.3)]
    results = paired_rows(cells, "ref")
    healthy = paired_rows(cells[:3], "ref")
    assert results["peer W8A8"] == healthy["peer"]  # the W8A8 pairing is untouched by the diverged W4A4 row
    assert results["ref W4A4"]["diverged"] == "1 of 8 samples hold NaN or Inf"
    assert all(math.isnan(results["ref W4A4"][key]) for key in ("psnr", "difference", "interval"))
    peer = results["peer W4A4"]
    assert peer["reference_diverged"] == "1 of 8 samples hold NaN or Inf" and "diverged" not in peer
    assert math.isfinite(peer["psnr"]) and math.isnan(peer["difference"])
    assert '"difference": null' in dumps_json(results)
