"""SIGTERM (``kill``, ``timeout``, ``scancel``, CI cancellation) and SIGHUP end a command as Ctrl-C does: its
cleanup runs. Python's default ended the process on the spot, so a `tadq quantize` terminated while saving left
its whole staging folder (``.OUT.tmp-*``, an artefact's size) beside ``--out`` for good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.distributed.tiny_runs import save_tiny_model
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.cli.interrupts import TORCHRUN_MARK, unwind_on_termination

HELPER = Path(__file__).with_name("_paused_command.py")
ROOT = Path(__file__).resolve().parents[2]
QUANT = ["--steps", "2", "--calib-trajectories", "2", "--threads", "1"]
WAIT_S = 120  # start-up, loading and calibrating the tiny model; a loaded 2-core machine takes a few seconds


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _default_disposition(sig: signal.Signals):
    """The child starts with ``sig`` at its default action, as a command started from a shell has it: a suite run
    under ``nohup`` (SIGHUP ignored, inherited) would otherwise hand the command an ignored SIGHUP, which tadq
    rightly leaves ignored, and the paused command would wait for good."""
    return lambda: signal.signal(sig, signal.SIG_DFL)


def _signalled_at(target: str, sig: signal.Signals, args: list, flag: Path) -> subprocess.CompletedProcess:
    """Run ``tadq ARGS`` paused before ``target``, send ``sig`` there, and return the finished process."""
    process = subprocess.Popen([sys.executable, str(HELPER), str(flag), target, *map(str, args)], env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=_default_disposition(sig))
    deadline = time.time() + WAIT_S
    while not flag.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), f"the command never reached {target}: {process.communicate(timeout=60)[0][-2000:]}"
    process.send_signal(sig)
    output = process.communicate(timeout=60)[0]
    return subprocess.CompletedProcess(process.args, process.returncode, output)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("signals") / "model", 0)


# ≈ 15 s each on a 2-core AVX2 CPU (a real process killed mid-save): both `make test-slow`; the default suite keeps
# the parts: a real SIGTERM unwinds (below) and an interrupt while saving leaves no staging folder
# (tests/cli/test_reproducible_outputs.py::test_interrupt_while_replacing_an_artefact_never_leaves_out_without_one)
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_quantize_terminated_while_saving_leaves_no_staging_folder(sig, model_dir, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", model_dir, "--out", out, "--cache-dir", tmp_path / "cache", *QUANT]
    done = _signalled_at("tadq.io.save:_publish", sig, args, tmp_path / "flag")  # the staging folder is whole
    assert done.returncode == 128 + sig, done.stdout[-2000:]
    assert "Traceback" not in done.stdout, done.stdout[-2000:]
    left = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("."))
    assert left == [], f"a terminated save left {left} beside --out"
    assert not out.exists()
    assert not [path.name for path in (tmp_path / "cache").iterdir() if path.name.startswith(".")]
    rerun = CliRunner().invoke(app, [str(a) for a in args])
    assert rerun.exit_code == 0, rerun.output
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0


def test_handlers_are_restored_and_an_ignored_signal_stays_ignored(monkeypatch):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set in the main thread")
    monkeypatch.delenv(TORCHRUN_MARK, raising=False)
    before = signal.getsignal(signal.SIGTERM)
    previous_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a command
    try:
        with unwind_on_termination():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            if before is signal.SIG_DFL:
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGHUP, previous_hup)


def test_torchrun_workers_keep_the_default(monkeypatch):
    """A rank blocked in a collective cannot run a Python handler: it must still die on torchrun's SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set in the main thread")
    monkeypatch.setenv(TORCHRUN_MARK, "job")
    before = signal.getsignal(signal.SIGTERM)
    with unwind_on_termination():
        assert signal.getsignal(signal.SIGTERM) is before


def test_a_real_sigterm_unwinds_with_the_shells_exit_code(monkeypatch):
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("needs the main thread and SIGTERM's default handler (else the signal would end pytest)")
    monkeypatch.delenv(TORCHRUN_MARK, raising=False)
    cleaned = []
    with pytest.raises(SystemExit) as raised, unwind_on_termination():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
        finally:
            cleaned.append(True)
    assert raised.value.code == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigbreak_unwinds_where_there_is_no_sighup(monkeypatch):
    """Windows has no SIGHUP: its closed console window and Ctrl-Break are SIGBREAK, which ended the command at once
    (no cleanup). SIGBREAK is played here by SIGUSR1, which Linux leaves to its default."""
    monkeypatch.delattr(signal, "SIGHUP")
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    with pytest.raises(SystemExit) as exited, unwind_on_termination():
        assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL  # else the signal below ends pytest
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5)  # the handler runs between bytecodes: at once
    assert exited.value.code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
