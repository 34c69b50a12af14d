#!/usr/bin/env bash
# fedcola's device checks on a machine with a CUDA GPU, in under 8 minutes: equivalence on the device,
# a 2-client ColA simulation with the server in bf16 on the GPU, LTE and GreenTrainer on the GPU, and
# estimated vs measured peak memory of a ~1B Llama. Writes docs/gpu_check/{results.json,README.md};
# exits with the number of failed checks. Extra arguments go to simulations/gpu_check.py
# (e.g. --only memory; --device cpu for a dry run without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec timeout 480 "$PY" -m simulations.gpu_check "$@"
