"""A real Flower deployment on one machine: a SuperLink and SuperNodes as separate processes on
loopback ports, optionally with TLS (a CA and a server certificate made with openssl) and SuperNode
authentication (ECDSA keys made with ssh-keygen, registered with ``flwr supernode register``).

With a ``gateway`` (TLS only), the SuperLink's one port (Fleet, Control and runtime APIs) stays
private and the SuperNodes connect to ``fedcola.gateway``, which forwards the Fleet routes alone:
``edge`` is then the flwr CLI config of a machine holding only ``ca.crt`` and the public address.

Used by the deployment tests and ``simulations/deploy_bench.py``; docs/deploy.md shows the same
commands for several machines. Every process is started in its own session and stopped by its
process-group id (``stop``), so nothing outlives the federation, also when a test fails.
"""

from __future__ import annotations

import json
import os
import atexit
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

FINISHED = "finished:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(home: Path) -> dict[str, str]:
    """Environment of a Flower process: a private FLWR_HOME, offline, this interpreter's scripts first,
    and SuperExec polling for new tasks every 50 ms (Flower's default 1 s; the SuperNode's own 3 s wait
    for messages is fixed in flwr 1.42)."""
    return os.environ | {
        "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05",
        "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60, **kwargs)


def make_tls(root: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost (SANs), signed by that CA."""
    root.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (root / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.pem"))
    _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fedcola-test-ca",
          "-keyout", str(ca_key), "-out", str(ca)])
    _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr)])
    (root / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
          "-extfile", str(root / "san.ext"), "-out", str(cert)])
    return {"ca": ca, "cert": cert, "key": key}


def make_node_key(root: Path, name: str) -> Path:
    """An ECDSA P-384 key pair (``<name>``, ``<name>.pub``, OpenSSH format, no passphrase)."""
    root.mkdir(parents=True, exist_ok=True)
    key = root / name
    _run(["ssh-keygen", "-t", "ecdsa", "-b", "384", "-N", "", "-q", "-f", str(key)])
    return key


class Loopback:
    """A SuperLink on ``127.0.0.1:<port>`` and SuperNodes started by :meth:`add_node`; ``connection``
    is the FLWR_HOME config.toml entry that ``flwr`` uses to reach it (federation ``name``)."""

    def __init__(self, root: Path, tls: dict[str, Path] | None = None, auth: bool = False, name: str = "loopback", gateway: bool = False):
        if (auth or gateway) and tls is None:
            raise ValueError("SuperNode authentication and the Fleet gateway need TLS")
        self.root, self.tls, self.auth, self.name = Path(root), tls, auth, name
        self.port = free_port()
        self.gateway_port = free_port() if gateway else None
        self.procs: dict[str, subprocess.Popen] = {}
        self.cli_home, self.edge = self.root / "cli-home", self.root / "edge-home"
        self._cli_config(self.cli_home, self.port)
        self._cli_config(self.edge, self.fleet_port)

    @property
    def fleet_port(self) -> int:
        """The port SuperNodes (and any edge machine) connect to: the gateway's, or the SuperLink's own."""
        return self.gateway_port or self.port

    def _cli_config(self, home: Path, port: int) -> None:
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{self.tls["ca"]}"' if self.tls else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.name}"\n\n[superlink.{self.name}]\naddress = "127.0.0.1:{port}"\n{security}\n')

    # --- processes ----------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        home = self.root / f"{name}-home"
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=flwr_env(home), start_new_session=True)
        log.close()
        if not self.procs:
            self._stop_on_exit()
        self.procs[name] = proc
        return proc

    def _stop_on_exit(self) -> None:
        """Stop every process group also when the owner exits or is terminated (SIGTERM, e.g. a timeout),
        not only through :meth:`stop`: the process groups outlive their parent otherwise."""
        atexit.register(self.stop)
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)

        def terminated(signum, frame):
            self.stop()
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, terminated)

    def _security(self, node: bool) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        if node:
            return ["--root-certificates", str(self.tls["ca"])]
        return ["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]), "--ssl-keyfile", str(self.tls["key"])]

    def start(self, timeout: float = 60) -> Loopback:
        """Start the SuperLink (and the gateway) and wait until their ports accept connections."""
        auth = ["--enable-supernode-auth"] if self.auth else []
        self._start("superlink", ["flower-superlink", *self._security(node=False), *auth, "--host", "127.0.0.1", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])
        self._wait_for("superlink", self.port, timeout)
        if self.gateway_port:
            self._start("gateway", [sys.executable, "-m", "fedcola.gateway", "--listen", f"127.0.0.1:{self.gateway_port}",
                                    "--superlink", f"127.0.0.1:{self.port}", "--superlink-ca", str(self.tls["ca"]),
                                    "--ssl-certfile", str(self.tls["cert"]), "--ssl-keyfile", str(self.tls["key"])])
            self._wait_for("gateway", self.gateway_port, timeout)
        return self

    def _wait_for(self, name: str, port: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"the {name} exited with {self.procs[name].returncode}: {self.log(name)[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the {name} did not open port {port} within {timeout} s")

    def add_node(self, name: str, node_config: dict, key: Path | None = None, warm: bool = False) -> subprocess.Popen:
        """Start a SuperNode (its own Runtime API port) with ``node_config`` and, with authentication, its
        private ``key``; ``warm``: in process isolation, its ClientApps launched by ``fedcola-superexec``
        (``<name>-exec``, forked from a process that imported their libraries once: ``fedcola.warm``)."""
        config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in node_config.items())
        auth = ["--auth-supernode-private-key", str(key)] if key is not None else []
        port = free_port()
        isolation = ["--isolation", "process"] if warm else []
        node = self._start(name, ["flower-supernode", *self._security(node=True), "--superlink", f"127.0.0.1:{self.fleet_port}",
                                  "--port", str(port), "--node-config", config, *auth, *isolation])
        if warm:
            self._start(f"{name}-exec", [sys.executable, "-m", "fedcola.warm", "--runtime-api-address", f"127.0.0.1:{port}", "--insecure",
                                         "--parent-pid", str(node.pid)])
        return node

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process and everything it started (its process group), and a SuperNode's warm
        SuperExec; wait until they are gone."""
        if f"{name}-exec" in self.procs:
            self.kill(f"{name}-exec", sig)
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever the group leader left behind (a flwr-serverapp that ignores SIGTERM)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop every process this federation started (SuperNodes first), by process-group id."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            if name in self.procs:  # a SuperNode's warm SuperExec goes with it
                self.kill(name, signal.SIGTERM)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    # --- flwr CLI -----------------------------------------------------------------------------
    def flwr(self, *args: str, cwd: Path | None = None, timeout: float = 120, home: Path | None = None) -> dict:
        """``flwr <args> --format json`` against this SuperLink (from ``home``: the operator's
        ``cli_home`` by default, ``edge`` for a machine that reaches only the Fleet port); the parsed
        JSON (``success`` false: RuntimeError)."""
        proc = subprocess.run(["flwr", *args, "--format", "json"], cwd=cwd, env=flwr_env(home or self.cli_home), capture_output=True, text=True,
                              timeout=timeout)
        out = proc.stdout
        try:
            result = json.loads(out[out.index("{"):])
        except ValueError:
            raise RuntimeError(f"flwr {' '.join(args)} printed no JSON (exit {proc.returncode}): {(out + proc.stderr)[-2000:]}") from None
        if not result.get("success", False):
            raise RuntimeError(f"flwr {' '.join(args)} failed: {result.get('error-message', result)}")
        return result

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key with the SuperLink (needed with authentication); its node id."""
        return int(self.flwr("supernode", "register", str(public_key)).get("node-id"))

    def nodes(self) -> list[dict]:
        return self.flwr("supernode", "list")["nodes"]

    def submit(self, app_dir: Path, run_config: str) -> int:
        """``flwr run`` the app in ``app_dir`` with ``run_config`` overrides; the run id."""
        return int(self.flwr("run", str(app_dir), self.name, "--run-config", run_config, cwd=app_dir, timeout=300)["run-id"])

    def status(self, run_id: int) -> str:
        return self.flwr("list", "--run-id", str(run_id))["runs"][0]["status"]

    def wait(self, run_id: int, timeout: float = 900, poll: float = 2.0) -> str:
        """Wait until the run is finished; its final status (``finished:completed`` on success)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(run_id)
            if status.startswith(FINISHED):
                return status
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} not finished after {timeout} s (status {status})")
