"""Edge-machine client data and state: a SuperNode's node config names its data (a partition or its own
file) and a state dir; ``context.state`` saved there after each message lets a restarted SuperNode
continue exactly where the old one stopped."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from tests import helpers
from fedcola import specs, client_app, runtime
from fedcola.fl import checkpoint, state
from fedcola.fl.ledger import Ledger

pytestmark = pytest.mark.usefixtures("one_thread", "task_identity")
RUN_ID = 7  # the Flower run of the ServerApp and of the clients' contexts


def _context(node_config):
    return Context(run_id=RUN_ID, node_id=3, node_config=node_config, state=RecordDict(), run_config={})


def _query(config, step):
    control = ConfigRecord({"step": step, "send-adapter": True})
    spec = {"cola.spec": specs.cola_client_spec(config).to_record()} if step == 0 else {}  # first contact, as the server sends it
    return Message(RecordDict({"config": ConfigRecord(dict(config) | {"server-round": 1}), "control": control, **spec}), dst_node_id=3, message_type="query.cola")


def _arrays(records: RecordDict):
    return {f"{name}/{k}": v for name, r in records.array_records.items() for k, v in r.to_torch_state_dict().items()}


def test_restarted_node_continues_exactly_from_its_state_dir(cola_config, tmp_path):
    config = cola_config
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "state")}
    strategy = helpers.cola_strategy(config)
    live = _context(node_config)
    grid = helpers.ColaLoopGrid([3], config, contexts={3: live}, client_app=True)  # node 3 through the ClientApp's handlers
    helpers.cola_interval(strategy, grid, config, rnd=1, step=0)  # query, server gradients, fit, reply taken
    (fit,) = helpers.cola_interval(strategy, grid, config, rnd=1, step=1, send=False).fits  # queried; its fit not sent yet
    path = state.client_dir(tmp_path / "state", "run-7", 0) / "round-1.safetensors"  # no run-key in the config: the Flower run's id
    saved = state.read(path)
    assert _arrays(saved).keys() == _arrays(live.state).keys()
    assert all(torch.equal(v, _arrays(live.state)[k]) for k, v in _arrays(saved).items())
    assert dict(saved.config_records[state.NODE]) == {"messages": 3, "restores": 0, "server-round": 1, "run-id": "7", "generation": 0, "first-round": 1}

    restarted = _context(node_config)  # a new SuperNode process: empty context.state
    from_disk = client_app.cola_train_handler(fit, restarted)
    continued = client_app.cola_train_handler(fit, live)
    a, b = (r.content.array_records["adapter"].to_torch_state_dict() for r in (from_disk, continued))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert dict(restarted.state.config_records[state.NODE]) == {"messages": 4, "restores": 1, "server-round": 1, "run-id": "7", "generation": 0, "first-round": 1}
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # no temporary file left behind


def test_state_file_round_trips_every_record_kind(tmp_path):
    records = RecordDict({"w": ArrayRecord({"a": torch.randn(3, 2), "step": torch.tensor(4), "ids": torch.arange(5)}),
                          "meta": ConfigRecord({"version": 3, "name": "x", "flag": True, "lr": 0.5})})
    state.write(records, tmp_path / "s.safetensors")
    back = state.read(tmp_path / "s.safetensors")
    assert all(torch.equal(v, _arrays(records)[k]) and v.dtype == _arrays(records)[k].dtype for k, v in _arrays(back).items())
    assert dict(back.config_records["meta"]) == {"version": 3, "name": "x", "flag": True, "lr": 0.5}


def test_damaged_state_file_is_a_clear_error(tmp_path):
    path = tmp_path / "round-1.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable.*delete it"):
        state.restore(_context({}), tmp_path)


def test_node_data_path_maps_labels_onto_the_runs_classes(cola_config, tmp_path):
    config = cola_config
    own = tmp_path / "mine.csv"
    own.write_text("text,label\n" + "\n".join(f"good film {i},{i % 2}" for i in range(30)))
    node = runtime.node_options(_context({"partition-id": 5, "data-path": str(own)}))
    assert (node.partition_id, node.data_path) == (5, str(own))
    local = config | {runtime.DATA_PATH: str(own)}
    train, held_out = runtime.client_split(local, 5, 1), runtime.client_split(local, 5, 1, "validation")
    assert len(train) + len(held_out) == 30 and len(held_out) == round(30 * config["eval.client-fraction"])
    assert sorted(set(train["text"]) | set(held_out["text"])) == sorted(f"good film {i}" for i in range(30))
    assert all(int(t.rsplit(" ", 1)[1]) % 2 == y for t, y in zip(train["text"], train["label"]))
    folder = tmp_path / "folder"
    for label in ("0", "1"):
        (folder / label).mkdir(parents=True)
        (folder / label / "a.txt").write_text(f"plot {label}")
    by_folder = runtime.local_data(config, str(folder))
    assert sorted(zip(by_folder["text"], by_folder["label"])) == [("plot 0", 0), ("plot 1", 1)]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood,2\n")
    with pytest.raises(ValueError, match="label 2 is not a class"):
        runtime.local_data(config, str(bad))


def test_node_config_errors_are_one_line():
    with pytest.raises(ValueError, match="either num-partitions or data-path"):
        runtime.node_options(_context({"partition-id": 0}))
    with pytest.raises(ValueError, match="does not exist on this machine"):
        runtime.node_options(_context({"partition-id": 0, "data-path": "/nonexistent/x.csv"}))


def _claim(config, node, partition=0, context=None):
    """A query reply of ``partition``'s client arriving from Flower node ``node``: at first contact (a
    fresh ``context``) with its auxiliary models; later naming the version the server took then (0)."""
    context = context or _context({"partition-id": partition, "num-partitions": 2})
    query = _query(config, 0)
    known = bool(context.state.config_records)
    query.content.config_records["control"]["send-adapter"] = not known
    query.content.config_records["control"]["taken"] = 0 if known else -1
    msg = client_app.cola_query_handler(query, context)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_restarted_node_takes_over_its_adapter_id_from_the_departed_node(cola_config):
    """With ``cola.identity = claim`` (no SuperNode authentication), a restarted SuperNode has a new node
    id: it takes over its adapter id (partition) only once the old node is gone, and the old node's
    adapters leave the merged mean (no client counted twice)."""
    config = cola_config | {"cola.identity": "claim"}
    strategy = helpers.cola_strategy(config)
    reply = lambda node: _claim(config, node)  # noqa: E731

    strategy._connected = {1, 9}
    assert list(strategy._accept_queries(1, [reply(1)])) == [1]
    assert strategy._accept_queries(1, [reply(9)]) == {}  # node 1 is still connected
    strategy._connected = {9}
    assert list(strategy._accept_queries(1, [reply(9)])) == [9]
    assert list(strategy.book.adapters) == [9] and strategy.book.owner == {9: 0}


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
def test_bound_adapter_id_is_refused_to_another_node_and_its_owner_keeps_it(cola_config, tmp_path, mode):
    """``cola.identity = node`` (the default): an offline client's adapter id claimed by another node is
    refused with a logged reason, the owner's auxiliary models stay as they were, and the owner is accepted
    when it returns; after a server resume the checkpoint's binding holds the same way."""
    config = cola_config | {"cola.mode": mode, "cola.adapter": "linear" if mode == "merged" else "low-rank"}
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy = helpers.cola_strategy(config, ledger)
    strategy._connected = {1}
    owner = _context({"partition-id": 0, "num-partitions": 2})
    assert list(strategy._accept_queries(1, [_claim(config, 1, context=owner)])) == [1]
    held = {k: v.clone() for k, v in strategy.state_dict()[0].items()}
    strategy._connected = {9}  # the owner is offline; node 9 claims its id
    assert strategy._accept_queries(1, [_claim(config, 9)]) == {}
    assert "bound to node 1" in ledger._round["skipped"][-1]["reason"]
    assert strategy.book.owner == {1: 0}
    assert all(torch.equal(v, held[k]) for k, v in strategy.state_dict()[0].items()) and held.keys() == strategy.state_dict()[0].keys()
    strategy._connected = {1, 9}
    assert list(strategy._accept_queries(1, [_claim(config, 1, context=owner)])) == [1]
    assert strategy._accept_queries(1, [_claim(config, 9, partition=1)]) != {}  # a fresh id is free

    checkpoint.save(tmp_path / "ckpt", 1, *strategy.state_dict())
    saved = checkpoint.load(tmp_path / "ckpt")
    resumed = helpers.cola_strategy(config, ledger)
    resumed.load_state(saved.round, saved.tensors, saved.state)
    resumed._connected = {5, 1}
    assert resumed._accept_queries(2, [_claim(config, 5)]) == {}  # a stranger claims the checkpointed id 0
    assert "bound to node 1" in ledger._round["skipped"][-1]["reason"]
    assert list(resumed._accept_queries(2, [_claim(config, 1, context=owner)])) == [1]
    assert resumed.book.owner == {1: 0, 9: 1}
