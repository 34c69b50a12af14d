"""ColA, merged mode: the server holds your frozen classifier; the clients' low-rank auxiliary models are
averaged into one shared model, at a server cost that does not grow with the number of clients."""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from examples import task
from fedcola.cola.records import save_adapters
from fedcola.cola.spec import AdapterSpec
from fedcola.fl.ledger import Ledger
from fedcola.train import OptimizerSpec
from strategies import ColA

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(context.run_config.get("out-dir", "runs/example-cola-merged"))
    ledger = Ledger(out / "ledger.json", "cola", {"example": "cola_merged"})
    strategy = ColA(task.classifier(), ["query", "value", "classifier"], adapter=AdapterSpec("low-rank", r=4, alpha=8.0),
                    optimizer=OptimizerSpec("adamw", lr=1e-2), local_steps=3, min_nodes=2, batch_size=8, ledger=ledger)
    strategy.start(grid=grid, num_rounds=int(context.run_config.get("num-rounds", 2)))
    save_adapters(out / "adapters.safetensors", strategy.book.by_adapter_id())
    ledger.finish("completed")
