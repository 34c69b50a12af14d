"""`fedcola run` is a local simulation: no process of it (the CLI, Ray's GCS, raylet, agents and workers)
listens on a non-loopback address while it runs."""

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (``::ffff:127.0.0.1``: gRPC binds 127.0.0.1 on an AF_INET6 socket)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _listeners(root: psutil.Process) -> dict[tuple[str, int], str]:
    """The TCP listening sockets of ``root`` and all its descendants: (ip, port) -> the owner's command line."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    found = {}
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
            name = " ".join(proc.cmdline())[:100].rstrip()
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found[(c.laddr.ip, c.laddr.port)] = f"pid {proc.pid}: {name}"
    return found


def test_simulation_listens_on_loopback_only(tmp_path, tiny_assets):
    cmd = [sys.executable, "-m", "fedcola.cli", "run", "simulations/fedavg_lora_minilm.toml", "--run-dir", str(tmp_path / "run"),
           "--set", f'model="{tiny_assets["model"]}"', "--set", f'dataset="{tiny_assets["data"]}"',
           "--set", "num-clients=2", "--set", "rounds=1", "--set", "local-steps=2", "--set", "batch-size=4",
           "--set", "eval.max-examples=16", "--set", "data.max-length=16"]
    out_file = tmp_path / "out.txt"
    seen: dict[tuple[str, int], str] = {}
    with out_file.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            root = psutil.Process(proc.pid)
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                seen |= _listeners(root)
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    exposed = {f"{ip}:{port}": owner for (ip, port), owner in seen.items() if not _loopback(ip)}
    assert not exposed, f"listening on non-loopback addresses: {exposed}"
    assert seen, "no listening socket seen at all: the poll missed the run"
    assert proc.returncode == 0, out_file.read_text()[-3000:]
