"""Where the ColA server keeps its clients' auxiliary models, and which node owns which adapter.

Per client ``adapters[node]`` (frozen copies of the client's models as of its last taken reply: what
it sent, or in merged mode the held copy plus the change it sent), or, for merged linear
auxiliary models, only their parameter mean (``ParameterMean``: memory flat in K). A node's adapter
id (its partition id) is fixed at first contact. Who may claim an id later is the ``identity`` policy:

- ``"node"``: an adapter id stays bound to the Flower node id that first claimed it, for the run and
  across a server resume (the checkpoint keeps the binding). With SuperNode authentication a node id
  stands for a registered public key (the SuperLink checks every Fleet request's signature against
  it), so no other machine can take a client's adapter over.
- ``"claim"``: a node may take over an id whose node is no longer connected (a restarted SuperNode
  without authentication comes back under a new node id), and after a resume the first node claiming
  an id inherits the checkpointed state; any node that can reach the Fleet API can do the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedcola.cola import records
from fedcola.cola.adapters import Adapter
from fedcola.cola.server import ParameterMean
from fedcola.fl import wire


IDENTITIES = ("node", "claim")


def _norm(state: Mapping[str, torch.Tensor]) -> float:
    return float(sum(v.double().pow(2).sum() for v in state.values())) ** 0.5


class AdapterBook:
    """The auxiliary models the server holds and their owners. ``build()`` makes one client's
    auxiliary models (the template of every reply); ``changes``: train replies carry the change of a
    client's parameters packed in this dtype (merged mode, ``records.change_record``), not the whole
    fp32 models (None); ``use_mean`` (with changes) keeps only the parameter mean."""

    def __init__(self, build: Callable[[], dict[str, Adapter]], use_mean: bool = False, identity: str = "node", changes: str | None = None) -> None:
        if identity not in IDENTITIES:
            raise ValueError(f"identity must be one of {', '.join(IDENTITIES)}, got {identity!r}")
        if use_mean and changes is None:
            raise ValueError("the parameter mean is moved by changes: give their upload dtype")
        self.build, self.identity, self.changes = build, identity, changes
        self.template = records.adapter_record(build())
        self.template_norm = _norm(self.template.to_torch_state_dict())  # what an honest new client's auxiliary models measure
        self.reply_template = self.template if changes is None else wire.pack(self.template.to_torch_state_dict(), changes)
        self.adapters: dict[int, dict[str, Adapter]] = {}  # per client, unless `mean` holds them
        self.mean = ParameterMean(build()) if use_mean else None
        self.synced: dict[int, bool] = {}  # node -> the server holds the adapters of the node's last reply
        self.taken: dict[int, int] = {}  # node -> the version of its auxiliary models the server holds (changes: the replies' `version`)
        self.owner: dict[int, int] = {}  # node id -> adapter id (its partition id) fixed at first contact
        self.examples: dict[int, int] = {}
        self.resumed: dict[int, int] = {}  # adapter id -> the checkpoint's node id, until a node of this run claims it

    @property
    def known(self) -> set[int]:
        """Nodes whose auxiliary models the server holds."""
        return set(self.adapters) | (set(self.mean.n) if self.mean is not None else set())

    def adapter_sets(self) -> dict:
        """What merged mode folds into W: per client, or their parameter mean (``"mean"``)."""
        return {"mean": self.mean.adapters} if self.mean is not None else self.adapters

    def frozen(self, record: ArrayRecord) -> dict[str, Adapter]:
        adapters = self.build()
        records.load_adapter_record(adapters, record)
        for a in adapters.values():
            a.requires_grad_(False)
        return adapters

    def join(self, node: int, record: ArrayRecord, weight: float, version: int = 0) -> None:
        """A node's first auxiliary models (weight n_k of the parameter mean), of the client's ``version``."""
        if self.mean is not None:
            self.mean.add(node, record.to_torch_state_dict(), n=weight)
        else:
            self.adapters[node] = self.frozen(record)
        self.synced[node], self.taken[node] = True, version

    def reply_problem(self, record: ArrayRecord) -> str | None:
        """Why a train reply's ``adapter`` record is unusable: names, shapes, dtype (fp32 models, or
        changes in the upload dtype) and finite values, against the template."""
        if self.changes is None:
            return wire.check_arrays(record, self.reply_template)
        return wire.check_packed(record, self.reply_template, self.changes)

    def update(self, node: int, record: ArrayRecord, version: int = 0) -> None:
        """A train reply: the node's new auxiliary models, or the change Delta of its parameters (the
        client's ``version`` after it), added to the held copy as the client added it (``records.applied``)
        or moving the parameter mean; a change that would make them non-finite raises (a skip)."""
        if self.changes is None:
            records.load_adapter_record(self.adapters[node], record)
        elif self.mean is not None:
            self.mean.move(node, wire.unpack(record, self.changes))
        else:
            new = records.applied(records.adapter_state(self.adapters[node]), wire.unpack(record, self.changes))
            if not all(torch.isfinite(v).all() for v in new.values()):
                raise ValueError("the change makes the held auxiliary models non-finite")
            records.load_adapter_state(self.adapters[node], new)
        self.synced[node], self.taken[node] = True, version

    def change_norm(self, node: int, record: ArrayRecord) -> float:
        """||w' - w|| of a train reply against the auxiliary models held for ``node`` (||Delta|| when
        the reply carries the change)."""
        if self.changes is not None:
            return _norm(wire.unpack(record, self.changes))
        new = record.to_torch_state_dict()
        held = records.adapter_state(self.adapters[node])
        return float(sum((new[k].double() - held[k].double()).pow(2).sum() for k in held)) ** 0.5

    def first_contact_problem(self, node: int, record: ArrayRecord, ratio: float) -> str | None:
        """A node's first auxiliary models are bounded: ||theta_k|| <= ``ratio`` x the larger of a freshly
        built set's norm (what an honest new client sends) and the median norm of those held for other
        clients (a client rejoining with trained ones); ``ratio`` <= 0: off."""
        if ratio <= 0:
            return None
        held = [_norm(records.adapter_state(a)) for n, a in self.adapters.items() if n != node]
        if self.mean is not None and self.mean.n:
            held.append(_norm(records.adapter_state(self.mean.adapters)))
        reference = max(self.template_norm, float(np.median(held)) if held else 0.0)
        norm = _norm(record.to_torch_state_dict())
        if not norm <= ratio * reference:
            return f"first auxiliary models' norm {norm:.3g} exceeds {ratio:g} x {reference:.3g} (a new client's or the held ones' median)"
        return None

    def check_owner(self, node: int, adapter_id: int, connected: set[int]) -> str | None:
        """A node keeps the adapter id of its first reply; another node's id is refused (``"node"``), or
        only while that node is connected (``"claim"``)."""
        if node in self.owner and self.owner[node] != adapter_id:
            return f"reply carries adapter id {adapter_id}, but node {node} holds adapter {self.owner[node]}"
        held_by = [n for n, a in self.owner.items() if a == adapter_id and n != node]
        if self.identity == "node" and held_by:
            return f"adapter id {adapter_id} is bound to node {held_by[0]} (identity = node); node {node} may not claim it"
        held_by = [n for n in held_by if n in connected]
        return f"adapter id {adapter_id} is held by connected node {held_by[0]}" if held_by else None

    def own(self, node: int, adapter_id: int) -> None:
        """Record ``node`` as the holder of ``adapter_id``. A restarted SuperNode comes back with a new
        node id: it takes over the adapter id of the departed node, whose entries go (in merged mode
        they would otherwise count that client twice). In the parameter mean (merged linear) its share,
        its `synced` flag and the version it holds (``taken``) pass to the new node: the node's restored
        state (``state-dir``) continues the changes it sends from the version the server holds."""
        resumed = self.resumed.pop(adapter_id, None)
        if resumed is not None and node not in self.owner:
            self.rekey(resumed, node)
        if node not in self.owner:
            for old in [n for n, a in self.owner.items() if a == adapter_id]:
                log(INFO, "adapter id %d rejoined as node %d (was node %d)", adapter_id, node, old)
                if self.mean is not None and old in self.mean.n:
                    self.mean.n[node] = self.mean.n.pop(old)
                    self.synced[node] = self.synced.pop(old, False)
                    self.taken[node] = self.taken.pop(old, -1)
                for held in (self.owner, self.adapters, self.examples, self.taken):
                    held.pop(old, None)
        self.owner[node] = adapter_id

    def rekey(self, old: int, node: int) -> None:
        """Node ``node`` of a resumed run takes over the checkpointed state of node ``old`` (same adapter id)."""
        for held in (self.owner, self.adapters, self.examples, self.synced, self.taken):
            if old in held:
                held[node] = held.pop(old)
        if self.mean is not None and old in self.mean.n:
            self.mean.n[node] = self.mean.n.pop(old)

    def by_adapter_id(self) -> dict:
        """The held auxiliary models keyed by adapter id (partition id), or ``{"mean": ...}``."""
        if self.mean is not None:
            return self.adapter_sets()
        return {self.owner.get(node, node): ads for node, ads in self.adapters.items()}

    # --- checkpoint (server resume) ---------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Per-client auxiliary models (``adapters/<node>/...``) or the parameter mean's float64 S
        (``mean/...``) as tensors; node -> adapter id, ``synced``, examples, the mean's n_k as JSON."""
        tensors = {f"adapters/{node}/{k}": v for node, ads in self.adapters.items() for k, v in records.adapter_state(ads).items()}
        keyed = lambda held: {str(n): v for n, v in held.items()}  # noqa: E731  (JSON keys are strings)
        state = {"owner": keyed(self.owner), "synced": keyed(self.synced), "taken": keyed(self.taken), "examples": keyed(self.examples)}
        if self.mean is not None:
            tensors |= {f"mean/{k}": v for k, v in self.mean.sum.items()}
            state["mean-n"] = keyed(self.mean.n)
        return tensors, state

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Inverse of :meth:`state_dict`; every checkpointed adapter id waits for a node to claim it."""
        by_node = lambda key: {int(n): v for n, v in state.get(key, {}).items()}  # noqa: E731
        self.owner, self.synced, self.taken, self.examples = by_node("owner"), by_node("synced"), by_node("taken"), by_node("examples")
        nodes = {int(k.split("/", 2)[1]) for k in tensors if k.startswith("adapters/")}
        self.adapters = {n: self.frozen(ArrayRecord({k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"adapters/{n}/")}))
                         for n in sorted(nodes)}
        if self.mean is not None:
            self.mean.restore({k[len("mean/"):]: v for k, v in tensors.items() if k.startswith("mean/")}, by_node("mean-n"))
        self.resumed = {a: n for n, a in self.owner.items()}
