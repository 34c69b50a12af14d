"""FedAvg over peft LoRA (the baseline): Flower's FedAvg on your peft-wrapped classifier's trainable
tensors, with bad replies skipped with a reason instead of ending the run."""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from examples import task
from examples.fedavg_lora.client_app import lora
from fedcola.fl.ledger import Ledger
from fedcola.train import OptimizerSpec
from peft import get_peft_model
from strategies import FedAvgLoRA

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(context.run_config.get("out-dir", "runs/example-fedavg-lora"))
    ledger = Ledger(out / "ledger.json", "fedavg_lora", {"example": "fedavg_lora"})
    strategy = FedAvgLoRA(get_peft_model(task.classifier(), lora()), optimizer=OptimizerSpec("adamw", lr=1e-2), local_steps=4,
                          min_available_nodes=2, ledger=ledger)
    result = strategy.start(grid=grid, num_rounds=int(context.run_config.get("num-rounds", 2)))
    save_file(result.arrays.to_torch_state_dict(), str(out / "lora.safetensors"))
    ledger.finish("completed")
