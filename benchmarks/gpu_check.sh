#!/usr/bin/env bash
# GPU check (< 5 minutes on one GPU): the test suite with the CUDA device selected, then the timing of
# a statistics pass and of a 1,000-fact batch edit on the GPU. Run from anywhere:
#     bash benchmarks/gpu_check.sh
# Needs a Python environment with a CUDA build of torch; installs editflow into it if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import editflow, pytest" 2>/dev/null; then
  "$PY" -m pip install -q -e '.[test]'
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))"
export EDITFLOW_DEVICE=cuda HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
echo "== tests on cuda"
timeout 180 "$PY" -m pytest -q -x -m "not slow" tests/test_memit.py tests/test_workflow.py tests/test_stats.py tests/test_evaluate.py
echo "== timings on cuda"
timeout 100 "$PY" benchmarks/gpu_timing.py
