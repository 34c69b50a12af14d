"""Server resume: a run killed after round k and resumed from its checkpoint ends with the weights of
an uninterrupted run (same seed), and its ledger holds every round exactly once."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from safetensors.torch import load_file

from tests import helpers
from fedcola import client_app
from fedcola.fl import checkpoint
from fedcola.fl import ledger
from fedcola.fl import state
from fedcola.cli import main as cli_main
from tests.test_simulation import _leftovers, _tagged_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "num-clients=2", "--set", "rounds=3", "--set", "local-steps=2", "--set", "batch-size=4",
        "--set", "eval.max-examples=32", "--set", "data.max-length=32"]
TINY_COLA = [*TINY[:2], "--set", "rounds=2", *TINY[4:], "--set", "eval.client-max-examples=8"]
TINY_LTE = [*TINY[:2], "--set", "rounds=2", *TINY[4:]]


def _fedcola(args, tag, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "fedcola.cli", "run", *args], cwd=ROOT, env=os.environ | {"FEDCOLA_TEST_TAG": tag},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return checkpoint.load(run_dir, tensors=False).round
    except (FileNotFoundError, ValueError):  # not written yet
        return 0


def _killed_and_resumed(config_file: str, args: list[str], tmp_path: Path) -> tuple[Path, Path, int]:
    """An uninterrupted run, and the same run SIGKILLed (ServerApp, simulation and clients) as soon as
    its first checkpoint exists, then resumed with ``fedcola run --resume``; returns (full, resumed run
    dir, round of the checkpoint it resumed from). Asserts the resumed ledger holds each round once."""
    tag = uuid.uuid4().hex
    full, cut = tmp_path / "full", tmp_path / "cut"
    reference = _fedcola([config_file, "--run-dir", str(full), *args], tag)
    out, _ = reference.communicate(timeout=900)
    assert reference.returncode == 0, out[-3000:]

    victim = _fedcola([config_file, "--run-dir", str(cut), *args], tag)
    deadline = time.time() + 900
    while _checkpoint_round(cut) < 1 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)  # the ServerApp dies with its simulation, mid-run
    for p in _tagged_processes(tag):
        p.kill()
    victim.wait()
    killed_after = _checkpoint_round(cut)
    rounds = ledger.load(full / "ledger.json")["config"]["rounds"]
    assert 1 <= killed_after < rounds and ledger.load(cut / "ledger.json")["status"] == "running"

    resumed = _fedcola(["--resume", str(cut)], tag)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    result = ledger.load(cut / "ledger.json")
    assert result["status"] == "completed" and [r["round"] for r in result["rounds"]] == list(range(rounds + 1))
    assert result["resumed"][0]["after_round"] == killed_after
    assert not _leftovers(tag)
    return full, cut, killed_after


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key


def test_killed_fedavg_lora_run_resumes_to_the_uninterrupted_weights(tmp_path):
    full, cut, _ = _killed_and_resumed("simulations/fedavg_lora_minilm.toml", TINY, tmp_path)
    _assert_same(load_file(str(full / "final.safetensors")), load_file(str(cut / "final.safetensors")))


def _by_partition(run_dir: Path) -> dict:
    """A ColA run's final auxiliary models, keyed by adapter id (partition) in ``final.safetensors``."""
    return load_file(str(run_dir / "final.safetensors"))


def test_killed_cola_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """Merged low-rank ColA: the server's per-client auxiliary models and bookkeeping come from the
    checkpoint, each client's adapters + optimizer from its snapshot of the checkpointed round
    (the virtual clients of the killed run may have handled messages of the next round)."""
    full, cut, _ = _killed_and_resumed("simulations/cola_minilm_rt.toml", TINY_COLA, tmp_path)
    a, b = _by_partition(full), _by_partition(cut)
    assert {k.split("/", 1)[0] for k in a} == {"0", "1"}
    _assert_same(a, b)
    _assert_restored(cut)


def _assert_restored(run_dir: Path) -> None:
    """Every client of the resumed run continued from a snapshot (not afresh)."""
    folders = list((run_dir / "client-state").glob("*/partition-*"))
    assert len(folders) == 2
    for folder in folders:
        saved = state.snapshots(folder)
        assert int(state.read(saved[max(saved)]).config_records[state.NODE]["restores"]) == 1, folder


def test_killed_lte_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """Synchronous LTE: the checkpoint holds the fp32 master W and its version; each client restores
    W, heads, snapshot and optimizer state of the checkpointed round."""
    full, cut, _ = _killed_and_resumed("simulations/lte_gpt_hamlet.toml", TINY_LTE, tmp_path)
    _assert_same(load_file(str(full / "final.safetensors")), load_file(str(cut / "final.safetensors")))
    _assert_restored(cut)


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    assert cli_main(["run", "--resume", str(tmp_path)]) == 2
    assert "ledger.json" in capsys.readouterr().err
    run = tmp_path / "run"
    lg = ledger.Ledger(run / "ledger.json", "fedavg_lora", {"method": "fedavg_lora"})
    lg.save()
    assert cli_main(["run", "--resume", str(run), "--set", "lr=0.1"]) == 2
    assert "only rounds may be set" in capsys.readouterr().err
    assert cli_main(["run", "--resume", str(run)]) == 2
    assert "finished no round" in capsys.readouterr().err
    checkpoint.save(run, 1, {"w": torch.zeros(2)})
    (run / checkpoint.FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        checkpoint.load(run)


# --- client snapshots and the server's ColA state, in process (tiny BERT, local CSV) -----------------


RUN_ID = 7  # task_identity: the killed run's ServerApp


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    return helpers.tiny_cola_config(tiny_assets, {"cola.interval": 1, "local-steps": 1, "run-key": "key"})  # a round: one interval


def _context(run_id, partition=0, state_dir=None):
    node_config = {"partition-id": partition, "num-partitions": 2} | ({"state-dir": str(state_dir)} if state_dir else {})
    return Context(run_id=run_id, node_id=3, node_config=node_config, state=RecordDict(), run_config={})


def _grid(config, contexts):
    """The nodes (node id -> context) answering through the ClientApp's handlers (state dirs, snapshots)."""
    return helpers.ColaLoopGrid(sorted(contexts), config, contexts=contexts, client_app=True)


def _interval(strategy, grid, rnd, config):
    """Round ``rnd``'s interval (a round is one interval), as ``ColA.start`` runs it, every interval
    queried; returns the query and train messages the clients got."""
    interval = helpers.cola_interval(strategy, grid, config, rnd, 0)
    return interval.queries, interval.fits


def _adapter(reply: Message) -> dict:
    return reply.content.array_records["adapter"].to_torch_state_dict()


@pytest.mark.usefixtures("task_identity", "one_thread")
def test_resumed_client_rolls_back_to_its_snapshot_of_the_checkpointed_round(tiny, tmp_path):
    """A client that handled round 2 of the killed run (run 7) restores, in the run resumed after round 1
    (run 8), its round-1 snapshot and redoes round 2 exactly; a missing snapshot or another run's state
    is a clear error, never a silent fresh start."""
    config = tiny
    strategy = helpers.cola_strategy(config)
    killed = _context(7, state_dir=tmp_path)
    grid = _grid(config, {3: killed})
    q1, f1 = _interval(strategy, grid, 1, config)
    q2, f2 = _interval(strategy, grid, 2, config)  # the server dies after this, before round 2 ends
    folder = state.client_dir(tmp_path, "key", 0)
    assert sorted(state.snapshots(folder)) == [1, 2]

    reference = _context(99)  # an uninterrupted client without a state dir
    for msg in (*q1, *f1, *q2):
        client_app.cola_query_handler(msg, reference) if msg.metadata.message_type == "query.cola" else client_app.cola_train_handler(msg, reference)
    expected = _adapter(client_app.cola_train_handler(f2[0], reference))
    with pytest.raises(ValueError, match="other than its own"):  # the round-2 state is a wrong start: the server formed
        client_app.cola_train_handler(f2[0], killed)  # these gradients with the round-1 one (cola.wire auto), and the client sees it

    q2, f2 = (_resent(m[0], "1") for m in (q2, f2))  # round 2 again, from the run resumed after round 1
    resumed = _context(8, state_dir=tmp_path)
    client_app.cola_query_handler(q2, resumed)
    got = _adapter(client_app.cola_train_handler(f2, resumed))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    node = resumed.state.config_records[state.NODE]
    assert (node["restores"], node["run-id"], node["generation"], node["first-round"]) == (1, "8", 1, 1)
    assert sorted(state.snapshots(folder)) == [1, 2]
    assert state.read(state.snapshots(folder)[2]).config_records[state.NODE]["run-id"] == "8"

    with pytest.raises(ValueError, match="not its resume"):
        client_app.cola_query_handler(_resent(q2, ""), _context(9, state_dir=tmp_path))
    state.snapshots(folder)[1].unlink()
    with pytest.raises(ValueError, match="snapshot of round <= 1 is missing"):
        client_app.cola_query_handler(_resent(q2, "1,1"), _context(10, state_dir=tmp_path))
    with pytest.raises(ValueError, match="no state for them"):  # the server holds its adapters: no fresh start
        client_app.cola_query_handler(q2, _context(11))
    second = helpers.cola_strategy(config)
    second.load_state(1, *strategy.state_dict())  # a resumed server, before any node claimed adapter id 0
    lost = Message(RecordDict({"config": q2.content.config_records["config"], "control": second._control(5, step=1, **{"send-adapter": True})}),
                   dst_node_id=5, message_type="query.cola")
    with pytest.raises(ValueError, match="no state for them"):
        client_app.cola_query_handler(lost, _context(12))


def _resent(msg: Message, resumed_after: str) -> Message:
    """``msg`` as a run with ``resumed-after`` would send it."""
    content = RecordDict(dict(msg.content.items()))
    content["config"] = ConfigRecord(dict(msg.content.config_records["config"]) | {"resumed-after": resumed_after})
    return Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)


@pytest.mark.usefixtures("task_identity", "one_thread")
def test_merged_linear_server_state_resumes_under_new_node_ids(tiny, tmp_path):
    """The parameter mean (float64 S, n_k), the synced flags (here one lost reply) and the adapter ids
    pass through a checkpoint to a strategy whose nodes have new ids: the next interval is the same."""
    config = tiny | {"cola.adapter": "linear", "cola.weighting": "examples", "cola.identity": "claim"}
    first = helpers.cola_strategy(config)
    live = {3: _context(7, 0), 4: _context(7, 1)}
    grid = _grid(config, live)
    grid.lose = lambda reply: reply.metadata.message_type == "train.cola" and reply.metadata.src_node_id == 4
    _interval(first, grid, 1, config)
    grid.lose = None
    assert first.book.synced == {3: True, 4: False}
    checkpoint.save(tmp_path, 1, *first.state_dict())
    saved = checkpoint.load(tmp_path)
    second = helpers.cola_strategy(config)
    second.load_state(saved.round, saved.tensors, saved.state)
    moved = {13: _context(8, 0), 14: _context(8, 1)}
    for old, new in zip(live.values(), moved.values()):
        state.write(old.state, tmp_path / "c.safetensors")
        for name, record in state.read(tmp_path / "c.safetensors").items():
            new.state[name] = record
    _interval(first, grid, 2, config)
    _interval(second, _grid(config, moved), 2, config)
    assert second.book.owner == {13: 0, 14: 1} and second.book.synced == {13: True, 14: True} and second.round_offset == 1
    assert list(second.book.mean.n.values()) == list(first.book.mean.n.values())
    assert all(torch.equal(first.book.mean.sum[k], second.book.mean.sum[k]) for k in first.book.mean.sum)


def test_rollback_drops_the_rounds_each_killed_run_never_checkpointed(tmp_path):
    """Run 1 handled rounds 1-3 (pruning kept 2 and 3) and was resumed after round 2 by run 2, which
    never contacted this client and was itself resumed after round 5: run 3 loads round 2, not the
    newer round 3 of the first killed run."""
    def snapshot(folder, r, run, generation, first):
        node = {"messages": r, "restores": 0, "server-round": r, "run-id": str(run), "generation": generation, "first-round": first}
        state.write(RecordDict({"w": ArrayRecord({"x": torch.tensor([float(r)])}), state.NODE: ConfigRecord(node)}), folder / f"round-{r}.safetensors")

    def restore(folder, resumes, run=3):
        context = Context(run_id=run, node_id=0, node_config={}, state=RecordDict(), run_config={})
        return state.restore(context, folder, resumes), context

    snapshot(tmp_path / "a", 2, 1, 0, 1)
    snapshot(tmp_path / "a", 3, 1, 0, 1)
    loaded, context = restore(tmp_path / "a", [2, 5])
    assert loaded and context.state["w"]["x"].numpy().tolist() == [2.0] and sorted(state.snapshots(tmp_path / "a")) == [2]
    snapshot(tmp_path / "b", 3, 1, 0, 3)  # first contact after the checkpoint: a new client, exactly
    assert restore(tmp_path / "b", [2])[0] is False and not state.snapshots(tmp_path / "b")
    snapshot(tmp_path / "c", 3, 1, 0, 1)  # its round-2 snapshot is gone
    with pytest.raises(ValueError, match="snapshot of round <= 2 is missing"):
        restore(tmp_path / "c", [2])
    snapshot(tmp_path / "d", 6, 3, 2, 1)  # written by this very run: a restarted SuperNode continues from it
    loaded, context = restore(tmp_path / "d", [2, 5])
    assert loaded and context.state["w"]["x"].numpy().tolist() == [6.0]
