"""Edge-machine client data and state: a SuperNode's node config names its data (a partition or its own
file) and a state dir; ``context.state`` saved there after each message lets a restarted SuperNode
continue exactly where the old one stopped."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from fedcola import client_app, models, runtime
from fedcola.cola import records as cola_fl
from fedcola.fl import state
from fedcola import config as cfg
from fedcola.cola.server import ColaServer
from strategies.cola import ColA

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0


def tiny_assets(root):
    """A tiny random BERT as a local model folder, a local CSV as the run's dataset (labels 0/1), and
    a node's own CSV file."""
    words = ["good", "bad", "film", "plot", "great", "dull", "fine", "awful"]
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=2))
    bert.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "data.csv").write_text("\n".join(["text,label"] + [f"{' '.join(rng.choice(words, 5))},{i % 2}" for i in range(80)]))
    (root / "own.csv").write_text("\n".join(["text,label"] + [f"{' '.join(rng.choice(words, 5))},{i % 2}" for i in range(30)]))
    return {"model": root / "model", "data": root / "data.csv", "own": root / "own.csv"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    assets = tiny_assets(tmp_path_factory.mktemp("deploy-state"))
    config = cfg.build({"method": "cola", "model": str(assets["model"]), "dataset": str(assets["data"]), "num-clients": 2,
                        "batch-size": 4, "cola.interval": 2, "data.max-length": 16, "lr": 1e-2})
    return config, assets


def _context(node_config):
    return Context(run_id=7, node_id=3, node_config=node_config, state=RecordDict(), run_config={})


def _query(config, step):
    control = ConfigRecord({"step": step, "send-adapter": True})
    return Message(RecordDict({"config": ConfigRecord(dict(config) | {"server-round": 1}), "control": control}), dst_node_id=3, message_type="query.cola")


def _interval(config, strategy, context, step):
    """One ColA interval for one client through the ClientApp's handlers: query, server gradients, fit."""
    reply = client_app.cola_query_handler(_query(config, step), context)
    reply.metadata.__dict__["_src_node_id"] = 3
    batches = strategy._accept_queries(1, [reply])
    fit = strategy.configure_fit(strategy.hidden_pairs(batches), ConfigRecord(dict(config) | {"server-round": 1}))[0]
    return fit


def _arrays(records: RecordDict):
    return {f"{name}/{k}": v for name, r in records.array_records.items() for k, v in r.to_torch_state_dict().items()}


def test_restarted_node_continues_exactly_from_its_state_dir(setup, tmp_path):
    config, _ = setup
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "state")}
    strategy = ColA(ColaServer(models.load_model(config["model"], "classification", num_labels=2), cola_fl.targets_of(config)), config, num_labels=2)
    live = _context(node_config)
    client_app.cola_train_handler(_interval(config, strategy, live, 0), live)
    fit = _interval(config, strategy, live, 1)
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


def test_node_data_path_maps_labels_onto_the_runs_classes(setup, tmp_path):
    config, _ = setup
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


def test_restarted_node_takes_over_its_adapter_id_from_the_departed_node(setup):
    """A restarted SuperNode has a new node id: it takes over its adapter id (partition) only once the
    old node is gone, and the old node's adapters leave the merged mean (no client counted twice)."""
    config, _ = setup
    strategy = ColA(ColaServer(models.load_model(config["model"], "classification", num_labels=2), cola_fl.targets_of(config)), config, num_labels=2)

    def reply(node):
        msg = client_app.cola_query_handler(_query(config, 0), _context({"partition-id": 0, "num-partitions": 2}))
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    strategy._connected = {1, 9}
    assert list(strategy._accept_queries(1, [reply(1)])) == [1]
    assert strategy._accept_queries(1, [reply(9)]) == {}  # node 1 is still connected
    strategy._connected = {9}
    assert list(strategy._accept_queries(1, [reply(9)])) == [9]
    assert list(strategy.adapters) == [9] and strategy.owner == {9: 0}
