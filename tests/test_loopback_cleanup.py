"""A loopback deployment's process groups go when their owner is terminated (a timeout's SIGTERM), not
only when it calls ``stop()``: nothing is left running behind an interrupted test or benchmark."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWNER = """
import sys, time
from pathlib import Path
from fedcola import loopback
fed = loopback.Loopback(Path(sys.argv[1])).start()
print(fed.procs["superlink"].pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_terminated_owner_takes_its_superlink_down(tmp_path):
    env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0"}
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        superlink = int(owner.stdout.readline())
        assert _alive(superlink)
        owner.send_signal(signal.SIGTERM)
        owner.wait(timeout=60)
        deadline = time.time() + 60
        while _alive(superlink) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(superlink), "the SuperLink outlived its terminated owner"
    finally:
        if owner.poll() is None:
            owner.kill()
