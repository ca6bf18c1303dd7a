"""quickstart.warm_start: a stage forked from the preloaded server behaves as `python -m module` would."""
import json
import os
import signal
import subprocess
import sys

import pytest

from quickstart import warm_start
from quickstart.stages import Runner
from quickstart.config import QuickstartError

pytestmark = pytest.mark.skipif(not warm_start.available(), reason="no fork server on this platform")


def test_a_fork_runs_the_module_as_main_with_its_argv_environment_session_and_exit_code(tmp_path):
    out = tmp_path / "seen.json"
    proc = warm_start.start("warm_probe", [out, 3], dict(os.environ, PROBE="stage env"), threads=1)
    assert proc.wait(timeout=120) == 3 and proc.poll() == 3
    seen = json.loads(out.read_text())
    assert seen["argv"] == [str(out), "3"] and seen["main"] == "__main__"
    assert seen["probe"] == "stage env" and seen["threads"] == 1
    assert seen["pid"] == proc.pid and seen["sid"] == proc.pid  # its own session, as start_new_session gives
    assert os.getsid(0) != proc.pid


def test_an_exception_is_exit_code_1_and_a_signal_is_minus_its_number(tmp_path):
    assert warm_start.start("warm_probe", [tmp_path / "a.json", 99], os.environ).wait(timeout=120) == 1
    not_runnable = warm_start.start("time", [], os.environ)  # a built-in module has no code to run: code 1
    assert not_runnable.wait(timeout=120) == 1
    proc = warm_start.start("http.server", ["--bind", "127.0.0.1", "0"], os.environ)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    proc.send_signal(signal.SIGTERM)  # an ended process: nothing to do, no error


def test_the_runner_forks_and_reports_a_failed_stage(tmp_path, capfd):
    runner = Runner(threads=1)
    assert runner.warm
    out = tmp_path / "seen.json"
    runner("warm_probe", [out, 0], "the probe")
    assert json.loads(out.read_text())["threads"] == 1
    with pytest.raises(QuickstartError, match="the probe failed .warm_probe exit code 4"):
        runner("warm_probe", [out, 4], "the probe")
    assert f"+ {sys.executable} -m warm_probe {out} 4" in capfd.readouterr().err
    assert not Runner(warm=False).warm and not Runner(python="/usr/bin/python3", threads=1).warm
