"""The results table and the report JSON: every value a metric can hand them, written so a reader can parse it."""

from __future__ import annotations

import json

import numpy as np
import torch

from tadq.report import dumps_json, markdown_table
from tadq.report.tables import format_cell

COLUMNS = (("method", "method"), ("psnr", "PSNR"))


def test_a_name_with_a_bar_or_a_line_break_keeps_the_markdown_table_whole() -> None:
    """A ``|`` in a cell opened a column and a line break ended the row."""
    table = markdown_table([{"method": "a | b\nc", "psnr": 1.0}], COLUMNS)
    lines = table.splitlines()
    assert len(lines) == 3 and lines[2] == "| a \\| b c | 1.00 |"


def test_numpy_and_tensor_scalars_are_written_as_python_numbers() -> None:
    """A numpy float32 NaN was printed "nan" (not the "NaN" a Python float gets) and dumps_json raised TypeError."""
    for nan in (np.float32("nan"), torch.tensor(float("nan"))):
        assert format_cell("psnr", nan) == "NaN"
        assert json.loads(dumps_json({"psnr": nan})) == {"psnr": None}
    assert format_cell("psnr", np.float32(31.25)) == "31.25"
    assert json.loads(dumps_json({"psnr": np.float32(31.25), "n": np.int64(3)})) == {"psnr": 31.25, "n": 3}
    assert format_cell("method", "W8A8") == "W8A8"
