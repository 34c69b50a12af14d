"""fedcola: ColA, LoRA-the-Explorer and GreenTrainer on Flower (see docs/ARCHITECTURE.md)."""

import warnings

# transformers 5 warns from inside peft about a renamed attribute on every model wrap; it is not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

__version__ = "0.1.0"
