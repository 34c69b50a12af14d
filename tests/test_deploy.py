"""Flower's Deployment Engine on loopback: a SuperLink and SuperNodes as real processes, short ColA and
LTE runs submitted with ``flwr run . <federation>``, the final status read back with ``flwr list``
(``--stream``'s exit code is 0 even when the ServerApp fails), every process stopped by its
process-group id, also when a test fails (``fedcola.loopback``). Plain HTTP, then the documented
secure deployment: TLS, SuperNode authentication, the SuperLink on loopback and the SuperNodes behind
the Fleet gateway (``fedcola.gateway``), with a node whose key was never registered and an edge
machine that holds only ``ca.crt``."""

import shutil
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from safetensors import safe_open

from fedcola import loopback
from fedcola.fl import ledger
from fedcola.fl import state

ROOT = Path(__file__).resolve().parents[1]
TINY = {"rounds": 1, "local-steps": 1, "batch-size": 4, "eval.max-examples": 16, "eval.client-max-examples": 8, "data.max-length": 16}

pytestmark = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl and ssh-keygen")


def run_config(assets, method: str, out_dir: Path, num_clients: int, **overrides) -> str:
    """``--run-config`` of a short run on the tiny model and dataset (``local_steps=3`` -> ``local-steps=3``)."""
    keys = TINY | {"method": method, "num-clients": num_clients, "model": str(assets["model"]), "dataset": str(assets["data"]),
                   "out-dir": str(out_dir)} | {k.replace("_", "-"): v for k, v in overrides.items()}
    value = lambda v: f"'{v}'" if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731  (TOML values)
    return " ".join(f"{k}={value(v)}" for k, v in keys.items())


def run_and_check(fed, assets, method, out_dir, num_clients):
    """Submit a short run, wait for its final status, and check what the ServerApp wrote."""
    run_id = fed.submit(ROOT, run_config(assets, method, out_dir, num_clients))
    status = fed.wait(run_id)
    assert status == "finished:completed", f"{status}\n{fed.log('superlink')[-3000:]}"
    (ledger_file,) = list(out_dir.rglob("ledger.json"))  # the run dir's name holds the model path
    run_dir = ledger_file.parent
    result = ledger.load(ledger_file)
    assert result["status"] == "completed" and len(result["rounds"]) == 2
    assert sorted(c["partition_id"] for c in result["rounds"][1]["clients"]) == list(range(num_clients))
    assert not result["rounds"][1].get("skipped")
    return run_id, run_dir


def _stopped(fed):
    """Stop the federation; no process it started (SuperExec, ServerApp, ClientApp ones included) is left."""
    started = [psutil.Process(p.pid) for p in fed.procs.values() if psutil.pid_exists(p.pid)]
    started += [c for p in started for c in p.children(recursive=True)]
    fed.stop()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


def _partitions(root: Path, warm: bool = False, own: Path | None = None):
    """A plain-HTTP federation on ``root``: two SuperNodes on partitions of the run's dataset (+ one on its
    ``own`` CSV file), each with a state dir; ``warm``: their ClientApps launched by ``fedcola-superexec``."""
    fed = loopback.Loopback(root).start()
    try:
        for i in range(2):
            fed.add_node(f"node{i}", {"partition-id": i, "num-partitions": 2, "state-dir": str(root / f"state{i}")}, warm=warm)
        if own is not None:
            fed.add_node("node2", {"partition-id": 2, "data-path": str(own), "state-dir": str(root / "state2")})
        yield fed
    finally:
        _stopped(fed)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_assets):
    """3 SuperNodes over plain HTTP: two hold partitions of the run's dataset, one its own CSV file."""
    yield from _partitions(tmp_path_factory.mktemp("plain"), own=tiny_assets["own"])


def test_cola_and_lte_runs_on_a_plain_deployment(plain, tiny_assets, tmp_path):
    run_id, run_dir = run_and_check(plain, tiny_assets, "cola", tmp_path / "cola", 3)
    with safe_open(str(run_dir / "final.safetensors"), "pt") as f:
        assert len({k.split("/", 1)[0] for k in f.keys()}) == 3  # one set of auxiliary models per node
    for i in range(3):  # query, fit, evaluation query: each saved after it was handled
        saved = state.read(_latest(plain.root / f"state{i}"))
        assert dict(saved.config_records[state.NODE]) == {"messages": 3, "restores": 0, "server-round": 1, "run-id": str(run_id), "generation": 0, "first-round": 1}
        assert "cola.adapters" in saved.array_records and "cola.optimizer" in saved.array_records
    run_and_check(plain, tiny_assets, "lte", tmp_path / "lte", 3)
    assert "Start `flwr-clientapp` process" in plain.log("node0")  # Flower's SuperExec: a fresh process per message


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """2 SuperNodes in process isolation, their ClientApps launched warm by ``fedcola-superexec``."""
    yield from _partitions(tmp_path_factory.mktemp("warm"), warm=True)


def test_cola_and_lte_run_on_warm_supernodes_from_their_tokenised_splits(warm, tiny_assets, tmp_path):
    run_and_check(warm, tiny_assets, "cola", tmp_path / "cola", 2)
    run_and_check(warm, tiny_assets, "lte", tmp_path / "lte", 2)
    for i in range(2):
        assert "Start `flwr-clientapp` process" not in warm.log(f"node{i}") + warm.log(f"node{i}-exec")  # forked, not started
        assert len(list((warm.root / f"state{i}" / "tokens").glob("*.safetensors"))) == 2  # train and validation split, tokenised once


def _latest(state_dir: Path) -> Path | None:
    """The snapshot a SuperNode's state dir (per run key and partition, per round) received last."""
    return max(state_dir.glob("*/partition-*/round-*.safetensors"), key=lambda p: p.stat().st_mtime_ns, default=None)


def _messages(state_dir: Path) -> int:
    path = _latest(state_dir)
    return int(state.read(path).config_records[state.NODE]["messages"]) if path else 0


def test_killed_supernode_run_goes_on_and_restarted_node_resumes_from_its_state(plain, tiny_assets, tmp_path):
    """SIGKILL a SuperNode (and its ClientApp process) right after its first ColA update: the server
    skips the dead node's replies (logged, ledger ``skipped``) and finishes with the others; the
    restarted SuperNode (same node config, a new node id: no SuperNode authentication, so
    ``cola.identity = claim``) loads its saved state and rejoins under its adapter id, whose old node
    leaves the merged mean."""
    out = tmp_path / "kill"
    run_id = plain.submit(ROOT, run_config(tiny_assets, "cola", out, 3, local_steps=3, **{"cola.identity": "claim"}))
    saved = plain.root / "state1"
    deadline = time.time() + 600
    while _messages(saved) < 2:  # query + fit of the first interval handled and saved
        assert time.time() < deadline, plain.log("node1")[-3000:]
        time.sleep(0.2)
    plain.kill("node1")
    at_kill = _messages(saved)
    plain.add_node("node1", {"partition-id": 1, "num-partitions": 2, "state-dir": str(plain.root / "state1")})
    assert plain.wait(run_id) == "finished:completed", plain.log("superlink")[-3000:]
    node = dict(state.read(_latest(saved)).config_records[state.NODE])
    assert node["restores"] == 1 and node["messages"] > at_kill
    assert "restored client state of run" in plain.log("node1")
    (ledger_file,) = list(out.rglob("ledger.json"))
    result = ledger.load(ledger_file)
    assert result["status"] == "completed"
    assert any("unavailable" in s["reason"].lower() for s in result["rounds"][1]["skipped"]), result["rounds"][1].get("skipped")
    with safe_open(str(ledger_file.parent / "final.safetensors"), "pt") as f:
        assert len({k.split("/", 1)[0] for k in f.keys()}) == 3  # partition 1 once, under its new node id


def test_async_lte_merges_on_arrival_on_warm_supernodes(warm, tiny_assets, tmp_path):
    """Async LTE on the Deployment Engine (push / pull): every reply is merged as it arrives and its
    sender re-dispatched at once, so a 100x straggler (``lte.slowdown``) merges less often than the
    other node and the run still completes with ``rounds`` x nodes merges. Warm SuperNodes, and a
    straggler whose sleep (about 15 s) is several exchanges long: on a plain SuperNode every message
    starts a fresh process (seconds of imports on a loaded machine), which hid a 20x straggler."""
    out = tmp_path / "async"
    run_id = warm.submit(ROOT, run_config(tiny_assets, "lte", out, 2, rounds=3, local_steps=2, **{"lte.async": True, "lte.slowdown": "0:100"}))
    assert warm.wait(run_id) == "finished:completed", warm.log("superlink")[-3000:]
    (ledger_file,) = list(out.rglob("ledger.json"))
    result = ledger.load(ledger_file)
    merges = [m for r in result["rounds"] for m in r["server"].get("merges", [])]
    counts = Counter(m["partition_id"] for m in merges)
    assert result["status"] == "completed" and len(merges) == 6, merges
    assert counts[0] < counts[1], counts  # the straggler's replies arrive, and merge, less often
    assert max(m["staleness"] for m in merges) >= 1  # merges happened while the other trained


@pytest.fixture(scope="module")
def secure(tmp_path_factory, tiny_assets):
    """TLS (a CA and a server certificate with SANs for 127.0.0.1 / localhost), SuperNode authentication
    and the Fleet gateway: two registered ECDSA keys, and one key that was never registered."""
    root = tmp_path_factory.mktemp("secure")
    tls = loopback.make_tls(root / "certs")
    fed = loopback.Loopback(root, tls=tls, auth=True, gateway=True).start()
    try:
        keys = [loopback.make_node_key(root / "keys", f"node{i}") for i in range(3)]
        registered = {fed.register(keys[i].with_suffix(".pub")) for i in range(2)}
        for i in range(2):
            fed.add_node(f"node{i}", {"partition-id": i, "num-partitions": 2}, key=keys[i])
        yield SimpleNamespace(fed=fed, registered=registered, stranger=keys[2])
    finally:
        _stopped(fed)


def test_cola_and_lte_runs_with_tls_and_supernode_authentication(secure, tiny_assets, tmp_path):
    run_and_check(secure.fed, tiny_assets, "cola", tmp_path / "cola", 2)
    run_and_check(secure.fed, tiny_assets, "lte", tmp_path / "lte", 2)
    assert {int(n["node-id"]) for n in secure.fed.nodes() if n["status"] == "online"} == secure.registered


def test_unregistered_supernode_is_refused(secure):
    proc = secure.fed.add_node("stranger", {"partition-id": 5, "num-partitions": 6}, key=secure.stranger)
    assert proc.wait(timeout=120) != 0
    secure.fed.procs.pop("stranger")
    assert "Failed to initialize the connection to the SuperLink" in secure.fed.log("stranger")
    assert {int(n["node-id"]) for n in secure.fed.nodes()} == secure.registered


def test_edge_machine_with_only_the_ca_cannot_register_list_or_submit(secure, tiny_assets, tmp_path):
    """From the gateway's address with ``ca.crt`` (what every edge machine has), the Control API is not
    there: registering a key, listing nodes or runs and submitting a run all get 404 and change nothing.
    The SuperLink itself listens on loopback only; the operator's commands there work."""
    fed = secure.fed
    runs_before = fed.flwr("list")["runs"]
    attempts = {"register a node": ["supernode", "register", str(secure.stranger.with_suffix(".pub"))],
                "list nodes": ["supernode", "list"], "list runs": ["list"],
                "submit a run": ["run", str(ROOT), fed.name, "--run-config", run_config(tiny_assets, "cola", tmp_path, 2)]}
    for what, args in attempts.items():
        with pytest.raises(RuntimeError, match="404 Not Found") as refused:
            fed.flwr(*args, home=fed.edge, cwd=ROOT, timeout=300)
        assert "/v1/control/" in str(refused.value), what
    assert fed.flwr("list")["runs"] == runs_before
    assert {int(n["node-id"]) for n in fed.nodes()} == secure.registered
    listening = [c.laddr for c in psutil.Process(fed.procs["superlink"].pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening
