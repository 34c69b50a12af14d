"""ColA, unmerged mode: every client keeps a personal MLP auxiliary model (not mergeable into W) on the
shared frozen classifier; the server routes each sample through its owner's auxiliary model."""

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
    out = Path(context.run_config.get("out-dir", "runs/example-cola-unmerged"))
    ledger = Ledger(out / "ledger.json", "cola", {"example": "cola_unmerged"})
    strategy = ColA(task.classifier(), ["value", "classifier"], adapter=AdapterSpec("mlp", hidden=16), mode="unmerged",
                    optimizer=OptimizerSpec("adam", lr=1e-2), interval=2, local_steps=2, min_nodes=2, batch_size=8, ledger=ledger)
    strategy.start(grid=grid, num_rounds=int(context.run_config.get("num-rounds", 2)))
    save_adapters(out / "adapters.safetensors", strategy.book.by_adapter_id())  # each client's personal auxiliary models
    ledger.finish("completed")
