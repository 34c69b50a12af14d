"""The no-op ServerApp: ``rounds`` x ``exchanges`` message exchanges with every node, each sending
``down-bytes`` and asking for ``up-bytes`` back, through the same reply polling as fedcola's ServerApp
(``fedcola.fl.polling.PollingGrid``); each exchange's wall time goes to ``out`` (JSON)."""

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedcola.fl.polling import PollingGrid

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    grid = PollingGrid(grid)
    while len(nodes := list(grid.get_node_ids())) < int(config["nodes"]):
        time.sleep(0.05)
    payload = ArrayRecord([np.zeros(int(config["down-bytes"]), dtype=np.uint8)])
    rounds = []
    for rnd in range(1, int(config["rounds"]) + 1):
        times = []
        for _ in range(int(config["exchanges"])):
            start = time.perf_counter()
            replies = grid.send_and_receive([
                Message(RecordDict({"payload": payload, "config": ConfigRecord({"up-bytes": int(config["up-bytes"])})}), dst_node_id=n,
                        message_type="train", group_id=str(rnd))
                for n in nodes])
            if len(replies) != len(nodes) or any(r.has_error() for r in replies):
                raise RuntimeError(f"round {rnd}: {len(replies)} replies of {len(nodes)}")
            times.append(time.perf_counter() - start)
        rounds.append({"round": rnd, "exchange_s": times, "wall_time_s": sum(times)})
    if config["out"]:
        with open(str(config["out"]), "w") as f:
            json.dump({"rounds": rounds}, f)
