"""Reports: figures and tables."""

from tadq.report.figures import image_grid, save_comparison_grid, save_error_curves
from tadq.report.tables import COLUMNS, dumps_json, format_cell, json_ready, markdown_table

__all__ = ["image_grid", "save_comparison_grid", "save_error_curves", "COLUMNS", "format_cell", "markdown_table",
           "json_ready", "dumps_json"]
