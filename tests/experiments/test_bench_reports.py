"""``tadq bench``'s reports and the command they print: the command, run as printed, regenerates the same report
(every flag the user gave, every sampler exactly, the --quick matrix said as such); text tadq did not write (a
model path, an error quoted in a status cell) is shown literally in the terminal, the Markdown and the HTML."""

from __future__ import annotations

import json
import re
import shlex
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tadq.experiments.rows.base as rows_base
from tadq.cli.app import app
from tadq.experiments.bench.config import BenchConfig, parse_sampler, sampler_name
from tadq.experiments.bench.report import markdown_text
from tadq.experiments.bench.rows import format_value

runner = CliRunner()

# a folder name a shell, Markdown, HTML and rich would each misread if it were pasted in unescaped
HOSTILE = "we ird $HOME 'q\" é :rocket: <script>alert(1)</script> a|b [/x] ~x~ _y_"  # "/": subfolders
_UNESCAPED_MARKUP = re.compile(r"(?<!\\)[<>\[\]|]")  # raw HTML, a link or a table column in Markdown
REASON = "no kernel for a|b <script>alert(2)</script> [/bold] :rocket:\nsecond line"


@pytest.mark.parametrize("name", ["ddim-eta0.123456789", "ddim-eta0.00001", "ddim-eta1", "ddim-eta0.5@7",
                                  "flow-euler-shift3.1234567", "flow-euler-shift0.0001-uniform@9", "dpmsolver++1"])
def test_sampler_names_parse_back_to_the_same_sampler(name):
    """``:g`` rounded η to six digits (another sampler, another folder) and wrote 1e-05, which is no sampler name."""
    sampler = parse_sampler(name, steps=4)
    for with_steps in (False, True):
        assert parse_sampler(sampler_name(sampler, with_steps), steps=sampler.num_steps) == sampler


def test_the_quick_matrix_is_named_in_its_command(tmp_path):
    quick = BenchConfig(methods=("naive",), presets=("W8A8",), quick=True, out_dir=str(tmp_path))
    assert shlex.split(quick.command())[:3] == ["tadq", "bench", "--quick"]
    assert "--quick" not in shlex.split(BenchConfig(methods=("naive",), out_dir=str(tmp_path)).command())


def test_markdown_text_stays_literal_on_one_line():
    cell = markdown_text(REASON)
    assert "\n" not in cell and not _UNESCAPED_MARKUP.search(cell)
    row = f"| ok | {cell} |"
    assert len(re.split(r"(?<!\\)\|", row)) == 4  # two columns: the escaped pipe opens none
    assert re.sub(r"\\(.)", r"\1", cell) == " ".join(REASON.splitlines())  # unescaping gives the text back


def test_a_diverged_row_s_nan_is_not_shown_as_unmeasured():
    """``–`` says "not measured"; a row that diverged was measured and its numbers are NaN, as ``tadq run`` shows."""
    assert format_value("psnr", None) == "–"
    assert format_value("psnr", float("nan")) == format_value("ssim", np.float32("nan")) == "NaN"
    assert format_value("psnr", np.float64(38.123)) == "38.12"


def test_a_build_time_that_was_not_recorded_shows_as_unmeasured_as_the_notes_say():
    """A base model kept without its timing record has a NaN build time: the bench printed "NaN" where its notes
    (and tadq run's table) say "–"."""
    from tadq.experiments.bench.report import NOTES

    assert any("– when it was saved without one" in note for note in NOTES)
    assert format_value("setup_s", float("nan")) == "–"
    assert format_value("setup_s", 12.0) == "12"


class _Balance(HTMLParser):
    """Open elements in order; fails on a closing tag that does not close the innermost open one."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
        self.stack.pop()


def _fails_hostile(bases, config, preset_name):
    raise ValueError(REASON)


def _untimed(folder: Path) -> dict[str, str]:
    """The three reports without what a rerun may change: wall times, the write time and each row's timings."""
    document = json.loads((folder / "report.json").read_text())
    document.pop("wall_s")
    for part in document["samplers"].values():
        part.pop("wall_s")
    clock = re.compile(r"Wall time of this invocation: \d+ s|Written [\d: -]+\.")
    return {"json": json.dumps(document, sort_keys=True),
            **{kind: clock.sub("", (folder / f"report.{kind}").read_text()) for kind in ("md", "html")}}


def test_the_printed_command_regenerates_the_report_and_hostile_text_stays_literal(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    monkeypatch.setitem(rows_base._METHODS, "fake-hostile", ("Fake hostile", _fails_hostile))
    model = tmp_path / HOSTILE / "model"
    model.parent.mkdir(parents=True)
    tiny_model_dir.rename(model)
    out = tmp_path / HOSTILE / "bench"
    args = ["bench", "--quick", "--model", str(model), "--presets", "W8A8", "--methods", "naive,fake-hostile",
            "--samplers", "ddim-eta0.123456789", "--steps", "2", "--num-samples", "2", "--calib-trajectories", "2",
            "--batch-size", "2", "--recon-iters", "3", "--out", str(out), "--cache-dir", str(model / "c d"),
            "--force-foreign", "--threads", "1"]  # a cache inside the model: allowed only with --force-foreign
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    report = json.loads((out / "report.json").read_text())
    command = report["command"]
    assert command in first.output  # printed as it is: no markup error, no emoji in place of ':rocket:'
    assert report["rows"][-1]["status"].startswith("not supported: ValueError: no kernel for a|b <script>")

    given = shlex.split(command)
    assert given[:2] == ["tadq", "bench"] and "--quick" in given
    flags = dict(zip(given[3:-1:2], given[4:-1:2], strict=True))  # after "tadq bench --quick": flag, value pairs
    assert flags["--model"] == str(model) and flags["--out"] == str(out) and flags["--recon-iters"] == "3"
    assert flags["--samplers"] == "ddim-eta0.123456789" and flags["--cache-dir"] == str(model / "c d")
    assert given[-1] == "--force-foreign"  # without it the rerun is refused where the first run was allowed

    markdown = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "<script" not in html and HOSTILE not in html
    assert markdown_text(str(model)) in markdown and str(model) not in markdown.replace(command, "")
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table] == ["| method", "| FP", "| naive PTQ", "| Fake hostile"]
    widths = {len(re.split(r"(?<!\\)\|", line)) for line in table}
    assert len(widths) == 1  # a "|" in the status opens no column, and its newline ends no row
    balance = _Balance()
    balance.feed(html)
    balance.close()
    assert balance.stack == [] and "script" not in balance.tags

    before = _untimed(out)
    again = runner.invoke(app, given[1:])  # the command as printed, into its own folder: every cell reused
    assert again.exit_code == 0, again.output
    assert _untimed(out) == before
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ddim-2-eta0.123456789", "models"]


@pytest.mark.parametrize("name", ["ddim-eta1.2.3", "ddim-eta.", "flow-euler-shift..", "flow-euler-shift1.5.2"])
def test_a_malformed_sampler_number_is_named_as_an_unknown_sampler(name):
    """``ddim-eta1.2.3`` matched the name pattern and then failed in float() with Python's own message ("could not
    convert string to float"); a malformed number is now an unknown sampler, with the names that exist."""
    with pytest.raises(ValueError, match=f"unknown sampler '{re.escape(name)}'"):
        parse_sampler(name)


def _measured(method: str, bits: str, psnr: float, **fd: float | None) -> dict:
    """One ``tadq run`` metrics row as ``write_report`` returns it (``fd``: its Fréchet-distance key and value)."""
    return {"method": method, "bits": bits, "agreement": None, "psnr": psnr, "ssim": 0.9, "final_mse": 1e-3,
            "setup_s": 1.0, "sampling_s": 2.0, **fd}


def _table(rows: list[dict], settings: list[dict]) -> dict:
    entries = [("fp" if row["method"] == "FP" else row["method"], row["bits"], index)
               for index, row in enumerate(rows)]
    return {"sampler": parse_sampler("ddim-eta0", steps=4), "entries": entries, "settings": settings,
            "results": {"rows": rows, "extras": {}}}


def test_the_bench_table_keeps_the_fd_of_the_features_its_rows_were_measured_on():
    """The photos model's rows carry ``fd_photos``: the bench copied ``fd_digits`` alone, so its FD column was empty
    and report.json lost the number ``tadq run``'s table shows."""
    from tadq.experiments.bench.rows import bench_rows, headline_columns

    rows = [_measured("FP", "W32A32", float("nan"), fd_photos=3.5), _measured("naive", "W8A8", 30.0, fd_photos=4.25)]
    table = bench_rows(_table(rows, [{"method": "fp"}, {"method": "naive"}]))
    assert [row["fd_photos"] for row in table] == [3.5, 4.25]
    columns = dict(headline_columns(table))
    assert columns.get("fd_photos") == "FD-photos ↓" and "fd_digits" not in columns
    digits = bench_rows(_table([_measured("FP", "W32A32", float("nan"), fd_digits=1.5)], [{"method": "fp"}]))
    assert dict(headline_columns(digits)).get("fd_digits") == "FD-digits ↓"


def test_peer_verdicts_on_a_model_without_fd_compare_psnr_and_do_not_crash():
    """A user's model has no FD (``None`` in every row): ``min`` over two tadq rows' ``None`` raised TypeError, after
    the whole bench had run, and no report was written."""
    from tadq.experiments.bench.rows import bench_rows, peer_verdicts

    rows = [_measured("FP", "W32A32", float("nan"), fd_digits=None),
            _measured("naive", "W8A8", 30.0, fd_digits=None), _measured("qdiffusion", "W8A8", 35.0, fd_digits=None),
            _measured("quanto", "W8A8", 32.0, fd_digits=None)]
    settings = [{"method": "fp"}, {"method": "naive"}, {"method": "qdiffusion"}, {"method": "quanto", "peer": {}}]
    verdicts = peer_verdicts(bench_rows(_table(rows, settings)))
    assert len(verdicts) == 1 and "beats quanto" in verdicts[0] and "35.00 vs 32.00" in verdicts[0]
    rows[3] = _measured("quanto", "W8A8", 32.0, fd_photos=2.0)
    for row, fd in zip(rows[:3], (1.0, 3.0, 2.5), strict=True):
        row.pop("fd_digits")
        row["fd_photos"] = fd
    verdicts = peer_verdicts(bench_rows(_table(rows, settings)))
    assert any("on FD-photos: 2.00 vs 2.50" in verdict for verdict in verdicts)
