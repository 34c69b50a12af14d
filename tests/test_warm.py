"""``fedcola-superexec`` (``fedcola.warm``): Flower's SuperExec launching each ClientApp task as a fork
of a process that imported the app's libraries once. A task's child runs Flower's ``run_clientapp`` with
the task's token and exits with its code, without the ``fedcola`` modules of the parent (the app comes
from the run's FAB), and is reaped; a module that cannot be preloaded is one line and exit 2. The
deployment tests run ColA and LTE on warm SuperNodes (``tests/test_deploy.py``)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec

from fedcola import warm

ROOT = Path(__file__).resolve().parents[1]


def _spec(token: str) -> ExecutionSpec:
    return ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:1", token=token, insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=None, suppress_output=False, task_id=1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_a_task_runs_flowers_run_clientapp_in_a_fork_without_the_parents_fedcola(tmp_path, monkeypatch):
    import flwr.supernode.runtime.run_clientapp as flower

    out = tmp_path / "child.json"

    def run_clientapp(**kwargs):  # what the child calls: record, then exit as Flower's does (flwr_exit)
        out.write_text(json.dumps({"token": kwargs["token"], "address": kwargs["runtime_api_address"], "pid": os.getpid(),
                                   "fedcola": sorted(m for m in sys.modules if m.startswith("fedcola"))}))
        raise SystemExit(3)

    monkeypatch.setattr(flower, "run_clientapp", run_clientapp)
    executor = warm.ForkExecutor()
    assert executor.launch(_spec("tok-1")).status == "accepted"
    deadline = time.time() + 30
    while not out.exists() and time.time() < deadline:
        time.sleep(0.05)
    seen = json.loads(out.read_text())
    assert seen["token"] == "tok-1" and seen["address"] == "127.0.0.1:1" and seen["pid"] != os.getpid()
    assert seen["fedcola"] == []  # the app's own code is imported from the FAB, never inherited
    assert "fedcola.warm" in sys.modules  # the parent keeps its modules
    _, status = os.waitpid(seen["pid"], 0)
    assert os.waitstatus_to_exitcode(status) == 3  # the task's exit code


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_finished_tasks_are_reaped():
    child = os.fork()
    if child == 0:
        os._exit(0)
    time.sleep(0.2)
    warm.ForkExecutor().reconcile()
    with pytest.raises(ChildProcessError):
        os.waitpid(child, os.WNOHANG)  # already reaped
    warm.ForkExecutor().reconcile()  # no child left: nothing to do, no error


def test_a_module_that_cannot_be_preloaded_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "fedcola.warm", "--preload", "torch,no_such_module_here", "--insecure"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fedcola-superexec: cannot preload no_such_module_here: No module named 'no_such_module_here'"
