"""LTE, asynchronous: each client's delta is merged into W as it arrives (staleness-discounted) and that
client is re-dispatched at once; a slow client never holds the others back."""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from examples import task
from fedcola.fl.ledger import Ledger
from fedcola.lte.spec import LTESpec
from fedcola.train import OptimizerSpec
from strategies import LTEAsync

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(context.run_config.get("out-dir", "runs/example-lte-async"))
    ledger = Ledger(out / "ledger.json", "lte", {"example": "lte_async"})
    spec = LTESpec(r=4, alpha=8.0, optimizer=OptimizerSpec("adamw", lr=3e-3), local_steps=4)
    strategy = LTEAsync(task.language_model(), spec, staleness_exponent=0.5, max_staleness=4, min_available_nodes=2, ledger=ledger)
    result = strategy.start(grid=grid, num_rounds=int(context.run_config.get("num-rounds", 2)))
    save_file(result.arrays.to_torch_state_dict(), str(out / "W.safetensors"))
    ledger.finish("completed")
