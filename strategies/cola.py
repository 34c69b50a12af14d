"""``ColA``: Collaborative Adaptation with Gradient Learning (Diao et al., arXiv 2404.13844) as a Flower strategy.

One interval (DESIGN.md, "ColA round"): ``query.cola`` -> each sampled client sends I batches (and, at
first contact, its auxiliary models); the server runs its frozen base model once per batch index over
all clients' batches (``ColaServer.hidden_grads``) and sends each client its rows of (x_m, G_m), or
where smaller the gradient they give (``fedcola.cola.payload``), in a ``train.cola`` message, which also asks a client sampled for the next interval for that interval's
batches; the client does gradient learning (``fedcola.cola.client.ColaClient``) and replies with its
auxiliary models. A round is ``local_steps`` intervals, then client-side evaluation. Bad replies are
skipped with a logged reason (``fedcola.cola.replies``). In your own ServerApp::

    ColA(model, ["query", "value", "classifier"], adapter=AdapterSpec("low-rank", r=8, alpha=16),
         optimizer=OptimizerSpec("adamw", lr=2e-3), local_steps=20).start(grid=grid, num_rounds=3)

Green-ColA (``green=GreenColA(rho, every)``, ``fedcola.green.cola``): only the selected layers' pairs
are captured and travel; the message lists them in ``control["layers"]``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from fedcola.cola import payload, records
from fedcola.cola.adapters import layer_dims
from fedcola.cola.book import AdapterBook
from fedcola.cola.costs import RoundCosts
from fedcola.cola.replies import ReplyCheck
from fedcola.cola.server import ColaServer, Mode
from fedcola.cola.spec import AdapterSpec, ClientSpec, sends_changes
from fedcola.fl.ledger import Ledger
from fedcola.fl import wire
from fedcola.fl.screening import MAX_EXAMPLES, Screened, Skips, wait_for_nodes
from fedcola.green.cola import GreenColA, LayerSelector
from fedcola.train import OptimizerSpec, evaluate_logits

QUERY, FIT = f"{MessageType.QUERY}.cola", f"{MessageType.TRAIN}.cola"


class ColA(Screened, Strategy):
    """ColA server strategy: holds the frozen base ``model`` (on the device and in the dtype it lives
    in) and every client's auxiliary models at the ``targets`` layers (names or patterns, as
    ``fedcola.cola.adapters.find_targets``), computes only hidden-representation gradients.

    ``batch_size`` / ``max_length`` bound the client batches accepted (``max_length`` defaults to the
    model's positions); ``eval_examples`` is the number of local validation examples a client sends
    for client-side evaluation; ``weighting`` = ``equal`` or ``examples`` (merge weights a_k);
    ``allow_empty_rounds`` lets a round in which no reply was accepted pass (a loud warning and a
    ledger status) instead of failing the run; ``identity`` = ``node`` (an adapter id stays with the
    node that first claimed it, also across a resume: use with SuperNode authentication) or ``claim``
    (a node may take over the id of a node that is gone: ``fedcola.cola.book``); ``offload_pairs`` and
    ``recompute`` make a lean server (``fedcola.cola.server``). ``wire`` is what a train message carries
    per layer (``fedcola.cola.payload``): ``pairs`` (x, G), ``grads`` (the gradient the server forms,
    low-rank and linear) or ``auto`` (the smaller, default), in ``wire_dtype`` (``int8``: pairs only);
    ``share_inputs`` sends an input shared by several layers once (exact; off only to measure it). In
    merged mode a client's train reply is the change of its auxiliary models in ``upload_dtype`` (fp16,
    fp32, bf16), which the client applies to itself as the server does (``records.change_record``)."""

    def __init__(
        self,
        model: nn.Module,
        targets: str | Sequence[str],
        *,
        adapter: AdapterSpec = AdapterSpec(),
        mode: Mode = "merged",
        optimizer: OptimizerSpec = OptimizerSpec(),
        interval: int = 1,
        local_steps: int = 1,
        fraction_train: float = 1.0,
        min_nodes: int = 1,
        batch_size: int = 64,
        max_length: int | None = None,
        eval_examples: int = 64,
        wire_dtype: str = "fp16",
        upload_dtype: str = "fp16",
        wire: str = "auto",
        share_inputs: bool = True,
        weighting: str = "equal",
        seed: int = 0,
        green: GreenColA | None = None,
        max_examples: int = MAX_EXAMPLES,
        max_update_ratio: float = 10.0,
        allow_empty_rounds: bool = False,
        identity: str = "node",
        offload_pairs: bool = False,
        recompute: bool = False,
        ledger: Ledger | None = None,
    ) -> None:
        if weighting not in ("equal", "examples"):
            raise ValueError(f"weighting must be 'equal' or 'examples', got {weighting!r}")
        if mode == "merged" and not adapter.mergeable:
            raise ValueError(f"{adapter.kind} auxiliary models are not mergeable: use mode 'unmerged' or 'detached'")
        if wire not in payload.WIRE_MODES or (wire == "grads" and adapter.kind == "mlp") or (wire_dtype == "int8" and wire != "pairs"):
            raise ValueError(f"ColA wire {wire!r} with {adapter.kind} auxiliary models and wire dtype {wire_dtype}: use one of "
                             f"{', '.join(payload.WIRE_MODES)}; gradients are formed for low-rank and linear models only, int8 is a pairs format")
        self.wire, self.share_inputs = wire, share_inputs
        self.server = ColaServer(model, targets, mode=mode, offload_pairs=offload_pairs, recompute=recompute)
        self.dims = {name: layer_dims(m) for name, m in self.server.targets.items()}
        self.spec = ClientSpec(self.dims, adapter, optimizer, interval, wire_dtype, seed, sends_changes=sends_changes(mode), upload_dtype=upload_dtype)
        on_device = lambda ads: {k: a.to(self.server.device) for k, a in ads.items()}  # noqa: E731  (fp32, beside the model)
        self.book = AdapterBook(lambda: on_device(adapter.build(self.dims, seed=0)), use_mean=self.spec.sends_changes and adapter.kind == "linear",
                                identity=identity, changes=upload_dtype if self.spec.sends_changes else None)
        config = getattr(model, "config", None)
        self.task = "causal-lm" if model.get_output_embeddings() is not None else "classification"
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.num_labels = config.num_labels if self.task == "classification" else None
        self.max_length = max_length or getattr(config, "max_position_embeddings", None) or 512
        self.local_steps, self.fraction_train, self.min_nodes, self.batch_size = local_steps, fraction_train, min_nodes, batch_size
        self.eval_examples, self.weighting, self.seed = eval_examples, weighting, seed
        self.max_examples, self.max_update_ratio = max_examples, max_update_ratio
        self.skips = Skips(ledger, allow_empty_rounds)
        self.costs = RoundCosts()
        self.check = ReplyCheck(self)
        self.green = self._green_selector(green) if green is not None and green.rho < 1.0 else None
        self._connected: set[int] = set()  # the nodes connected when this interval was configured
        self._step = 0  # the interval's global index: seeds client sampling and the clients' batch draws
        self._sampled: list[int] = []  # this interval's clients
        self._prefetched: dict[int, list[dict[str, torch.Tensor]]] = {}  # node -> batches of interval `_prefetch_step`
        self._prefetch_step = -1
        self._layers: tuple[str, ...] | None = None  # this interval's selected layers (Green-ColA), None = all
        self.round_offset = 0  # a resumed run continues after this round (`load_state`)

    def _green_selector(self, green: GreenColA) -> LayerSelector:
        """Green-ColA's selector, profiled at the run's server batch: the sampled clients' batches of
        ``max_length`` tokens (fixed-seed token ids)."""
        rows = max(1, math.ceil(self.fraction_train * self.min_nodes)) * self.batch_size
        return green.selector(self.server, rows, self.max_length, self.vocab_size, self.seed)

    @property
    def known(self) -> set[int]:
        return self.book.known

    def evaluation_groups(self) -> list[dict]:
        """The models the server evaluates: the shared merged model, or each client's personal model."""
        return [self.book.adapter_sets()] if self.server.mode == "merged" else [{n: a} for n, a in self.book.adapters.items()]

    def _control(self, node: int, **extra) -> ConfigRecord:
        """A message's control record: the version of the node's auxiliary models the server holds (``taken``,
        -1: none; merged mode, ``ColaClient.sync``); a resumed run lists the adapter ids whose checkpointed
        state no node has claimed yet (``held``): such a client must continue from its saved state, not start afresh."""
        held = {"held": sorted(self.book.resumed)} if self.book.resumed else {}
        return ConfigRecord({"taken": self.book.taken.get(node, -1), **held, **extra})

    def _message(self, node: int, config: ConfigRecord, control: ConfigRecord, message_type: str = QUERY, **records) -> Message:
        """A message to ``node``; a node whose auxiliary models the server does not hold gets the client spec."""
        content = RecordDict({"config": config, "control": control, **records})
        if node not in self.book.known:
            content["cola.spec"] = self.spec.to_record()
        return Message(content, dst_node_id=node, message_type=message_type)

    def summary(self) -> None:
        log(INFO, "\tColA: mode %s, %s auxiliary models on %d layers, interval I=%d, wire %s, Green-ColA rho %s", self.server.mode,
            self.spec.adapter.kind, len(self.dims), self.spec.interval, self.spec.wire_dtype, "off" if self.green is None else self.green.rho)

    def sample(self, grid: Grid, step: int) -> list[int]:
        """The clients of interval ``step``: a ``fraction_train`` sample of the connected nodes, seeded by the step."""
        nodes = sorted(grid.get_node_ids())
        self._connected = set(nodes)
        k = max(1, math.ceil(self.fraction_train * len(nodes)))
        return sorted(random.Random(self.seed * 100_003 + step).sample(nodes, k))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Query messages for the sampled clients of this interval whose batches did not come with their last reply."""
        self._sampled = self.sample(grid, self._step)
        if self._prefetch_step != self._step:
            self._prefetched = {}
        return [self._message(node, config, self._control(node, step=self._step, **{"send-adapter": node not in self.known}))
                for node in self._sampled if node not in self._prefetched]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Client-side evaluation: every client whose auxiliary models the server holds sends (a prefix
        of) its local validation split; the server runs that client's model on it (its personal model
        W + g_k, or the shared W + mean dW in merged mode): ColA clients hold no base model."""
        control = lambda n: self._control(n, step=-1, split="validation", **{"send-adapter": False, "max-examples": self.eval_examples})  # noqa: E731
        return [self._message(n, config, control(n)) for n in sorted(self.known - set(self.book.resumed.values()))]  # not the dead run's nodes

    def interval_batches(self, server_round: int, config: ConfigRecord, grid: Grid, timeout: float) -> dict[int, list[dict[str, torch.Tensor]]]:
        """This interval's usable batches by node (in node order): prefetched ones, and the query replies
        of the sampled clients that had none."""
        queries = list(self.configure_train(server_round, ArrayRecord(), config, grid))
        batches = self._accept_queries(server_round, grid.send_and_receive(queries, timeout=timeout)) if queries else {}
        batches |= {n: b for n, b in self._prefetched.items() if n in self._sampled}
        self._prefetched = {}
        return dict(sorted(batches.items()))

    def _accept_queries(self, server_round: int, replies: Iterable[Message], evaluation: bool = False) -> dict[int, list[dict[str, torch.Tensor]]]:
        """Usable batches by node: I training batches, or up to ``eval_examples`` local validation
        examples (``evaluation``); bad replies are skipped with the reason (also whatever raises)."""
        batches = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            got = self.skips.guard(server_round, node, lambda: self._accept_query(server_round, msg, node, evaluation))
            if got is not None:
                batches[node] = got
        return batches

    def _accept_query(self, server_round: int, msg: Message, node: int, evaluation: bool) -> list[dict[str, torch.Tensor]] | None:
        problem = self.check.query(msg, node, evaluation, self._connected)
        if problem is not None:
            self.skips.skip(server_round, node, problem)
            return None
        if node not in self.known:
            metrics = msg.content.metric_records["metrics"]
            self.book.join(node, msg.content.array_records["adapter"], int(metrics["num-examples"]) if self.weighting == "examples" else 1.0,
                           int(metrics.get("version", 0)))
        self.costs.clients[node]["bytes_up"] += sum(wire.nbytes(r) for r in msg.content.array_records.values())
        return self._take_batches(node, msg, evaluation)

    def _take_batches(self, node: int, msg: Message, evaluation: bool) -> list[dict[str, torch.Tensor]]:
        if not evaluation:
            self.book.examples[node] = int(msg.content.metric_records["metrics"]["num-examples"])
        return records.unpack_batches(msg.content.array_records["batch"])

    def hidden_pairs(self, batches: dict[int, list[dict[str, torch.Tensor]]]) -> dict[int, list[dict]]:
        """One forward + backward per batch index over all clients' batches; per-client rows of (x, G)
        (of the interval's selected layers only, with Green-ColA)."""
        weights = self.book.examples if self.weighting == "examples" and self.book.mean is None else None
        known = self.book.adapter_sets() if self.server.mode == "merged" else {n: self.book.adapters[n] for n in batches}
        out: dict[int, list[dict]] = {n: [] for n in batches}
        t0 = time.perf_counter()
        for i in range(self.spec.interval):
            hg = self.server.hidden_grads({n: b[i] for n, b in batches.items()}, known, weights, layers=self._layers)
            self.costs.add_server_step(hg, batches, i, self.spec.interval, self.task == "classification")
            for n in batches:
                out[n].append(hg.pairs[n])
        self.costs.compute_s += time.perf_counter() - t0
        return out

    def configure_fit(self, pairs: dict[int, list[dict]], config: ConfigRecord, grid: Grid | None = None, next_step: int | None = None) -> list[Message]:
        """``train.cola`` messages with each client's pairs; those sampled for interval ``next_step``
        (None: no next interval) are asked for its batches as well."""
        self._prefetch_step = -1 if next_step is None else next_step
        following = set(self.sample(grid, next_step)) if next_step is not None else set()
        messages = []
        for node, per_batch in pairs.items():
            enc = self.encode(node, per_batch)
            rounding = torch.Generator().manual_seed(hash((self.seed, self._step, node)) % 2**63)  # int8's stochastic rounding
            record = wire.pack(enc.tensors, self.spec.wire_dtype, rounding)
            self.costs.clients[node]["bytes_down"] += wire.nbytes(record)
            extra = {} if self._layers is None else {"layers": list(self._layers)}
            extra |= {"fingerprint": enc.fingerprint} if enc.fingerprint else {}
            control = self._control(node, **extra, **({"next-step": next_step} if node in following else {}))
            shared = {"shared": ConfigRecord(enc.shared)} if enc.shared else {}
            messages.append(self._message(node, config, control, FIT, pairs=record, **shared))
            self.book.synced[node] = False  # until its reply is taken
        return messages

    def encode(self, node: int, per_batch: list[dict]) -> payload.Encoded:
        """The node's payload (``fedcola.cola.payload``, ``wire``): gradients are formed only with the server's
        copy of the node's own last reply (``book.synced``) or, merged linear, with the parameter mean."""
        if self.book.mean is not None:
            adapters, own = self.book.mean.adapters, False
        else:
            adapters, own = (self.book.adapters[node] if self.book.synced.get(node, False) and node in self.book.adapters else None), True
        t0 = time.perf_counter()
        enc = payload.encode(per_batch, adapters, self.wire, own, self.share_inputs)
        self.costs.add_payload(enc, len(per_batch[0]) if per_batch else 0, time.perf_counter() - t0)
        return enc

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Take each client's updated auxiliary models, or the change of its parameters (merged mode);
        the server re-merges them next interval (``ReplyCheck.train_replies`` screens them, the norm of
        each change included). Batches for the next interval that a reply carries are kept for it."""
        usable = self.check.train_replies(server_round, replies)
        kept = sum(bool(self.skips.guard(server_round, node, lambda: self._take_fit(node, msg))) for node, msg in usable.items())
        self.skips.accepted(kept)
        return None, MetricRecord({"clients": kept})

    def _take_fit(self, node: int, msg: Message) -> bool:
        self.book.update(node, msg.content.array_records["adapter"], int(msg.content.metric_records["metrics"].get("version", 0)))  # may refuse it
        if "batch" in msg.content.array_records:
            self._prefetched[node] = self._take_batches(node, msg, evaluation=False)
        self.costs.add_reply(node, msg.content.metric_records["metrics"], sum(wire.nbytes(r) for r in msg.content.array_records.values()))
        return True

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client loss and task metric on local validation data (ledger), and their example-weighted mean."""
        accepted = self._accept_queries(server_round, replies, evaluation=True)
        t0 = time.perf_counter()
        for node, batches in accepted.items():
            adapters = self.book.adapter_sets() if self.server.mode == "merged" else {node: self.book.adapters[node]}
            self.costs.add_evaluation(node, evaluate_logits(self.server.predictor(adapters), batches, self.task))
        self.costs.compute_s += time.perf_counter() - t0
        return self.costs.client_evaluation(accepted)

    def begin_interval(self, rnd: int, step: int) -> None:
        """Green-ColA: the layers whose pairs this interval computes and sends (every layer in a probe)."""
        self._layers = None if self.green is None else self.green.begin_interval(rnd, step, tuple(self.dims))

    def end_interval(self, rnd: int, step: int) -> None:
        """Green-ColA: after a probe interval, re-select from the clients' importance reports."""
        if self.green is not None:
            self.green.end_interval(rnd, step, lambda n: self.book.examples[n] if self.weighting == "examples" else 1.0)

    def _flush_round(self, server_round: int) -> MetricRecord:
        """Write this round's costs (and Green-ColA's selection) to the ledger; return the round's training metrics."""
        green = {} if self.green is None else {"green": self.green.record(tuple(self.dims))}
        return self.costs.flush(server_round, self.ledger, self.book.owner, self.book.examples, **green)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Run ``num_rounds`` rounds of ``local_steps`` ColA intervals each (the multi-step round)."""
        log(INFO, "Starting ColA strategy:")
        self.summary()
        config = ConfigRecord() if train_config is None else train_config
        result, empty = Result(), ArrayRecord()
        if evaluate_fn and not self.round_offset:
            result.evaluate_metrics_serverapp[0] = evaluate_fn(0, empty)
        wait_for_nodes(grid, self.min_nodes, timeout)
        last_round = self.round_offset + num_rounds
        for rnd in range(self.round_offset + 1, last_round + 1):
            if self.ledger is not None:
                self.ledger.begin_round(rnd)
            self.skips.begin_round(rnd)
            for step in range(self.local_steps):
                config["server-round"] = rnd
                self._step = (rnd - 1) * self.local_steps + step
                batches = self.interval_batches(rnd, config, grid, timeout)
                if not batches:
                    log(WARNING, "round %d step %d: no usable query reply; skipping the interval", rnd, step)
                    continue
                self.begin_interval(rnd, step)
                last = rnd == last_round and step == self.local_steps - 1
                fit = self.configure_fit(self.hidden_pairs(batches), config, grid, None if last else self._step + 1)
                self.aggregate_train(rnd, grid.send_and_receive(fit, timeout=timeout))
                self.end_interval(rnd, step)
            self.skips.end_round(rnd)
            client_eval = self.aggregate_evaluate(rnd, grid.send_and_receive(self.configure_evaluate(rnd, empty, config, grid), timeout=timeout))
            if client_eval is not None:
                result.evaluate_metrics_clientapp[rnd] = client_eval
            result.train_metrics_clientapp[rnd] = self._flush_round(rnd)
            log(INFO, "round %d: %s", rnd, result.train_metrics_clientapp[rnd])
            if evaluate_fn:
                result.evaluate_metrics_serverapp[rnd] = evaluate_fn(rnd, empty)
        return result

    # --- checkpoint (server resume) ---------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What the next round needs, at the end of a round (``fedcola.fl.checkpoint``): the adapter book's
        state (``AdapterBook.state_dict``) and Green-ColA's selection."""
        tensors, state = self.book.state_dict()
        if self.green is not None and self.green.state() is not None:
            state["green"] = self.green.state()
        return tensors, state

    def load_state(self, server_round: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Continue after ``server_round`` from :meth:`state_dict`'s output. Nodes of the new run have new
        ids: the first reply carrying an adapter id takes over that id's state (``AdapterBook.own``)."""
        self.round_offset = server_round
        self.book.load_state(tensors, state)
        if self.green is not None and "green" in state:
            self.green.restore(state["green"])
