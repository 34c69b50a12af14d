"""LTE (LoRA-the-Explorer), synchronous: your Llama trained from scratch by parallel low-rank heads, one
per client, merged into the full weights W every round (T local steps)."""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from examples import task
from fedcola.fl.ledger import Ledger
from fedcola.lte.spec import LTESpec
from fedcola.train import OptimizerSpec
from strategies import LTE

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(context.run_config.get("out-dir", "runs/example-lte-sync"))
    ledger = Ledger(out / "ledger.json", "lte", {"example": "lte_sync"})
    spec = LTESpec(r=4, alpha=8.0, optimizer=OptimizerSpec("adamw", lr=3e-3), local_steps=4)
    strategy = LTE(task.language_model(), spec, min_available_nodes=2, ledger=ledger)
    result = strategy.start(grid=grid, num_rounds=int(context.run_config.get("num-rounds", 2)))
    save_file(result.arrays.to_torch_state_dict(), str(out / "W.safetensors"))
    ledger.finish("completed")
