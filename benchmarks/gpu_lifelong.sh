#!/usr/bin/env bash
# Lifelong editing of SmolLM2-135M on a GPU: VERSIONS × FACTS edits through the registry, every version
# promoted, the lineage's state carried, with the model's shipped defaults (editflow applies them by the
# file's digest: hparams and statistics budget); prints the per-version table
# (benchmarks/lifelong.py). Run from anywhere:
#     bash benchmarks/gpu_lifelong.sh
# Defaults: 9 versions × 100 edits, the 300 bundled CounterFact records after the first 12, then zsRE
# records. The data at hand holds 914 valid edit records (312 CounterFact, 602 zsRE), so 9 × 100 is the
# longest lineage it can run; with a fuller record file, RECORDS=full.json VERSIONS=20 gives the AlphaEdit
# paper's 20 × 100. Environment: MODEL (a GGUF path; default: `editflow fetch smollm2-135m`, cached),
# RECORDS (comma-separated files; the zsRE default is read from ../shared: elsewhere, copy it and point
# RECORDS at the copy), VERSIONS, FACTS, OFFSET, EDITFLOW_DEVICE (default cuda; cpu for a dry run with
# MODEL=default VERSIONS=2 FACTS=3 OFFSET=309, which crosses from CounterFact to zsRE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import editflow, gguf" 2>/dev/null; then
  "$PY" -m pip install -q -e '.[test]'
fi
export EDITFLOW_DEVICE=${EDITFLOW_DEVICE:-cuda} HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
if [ "$EDITFLOW_DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))"
fi
MODEL=${MODEL:-$(editflow fetch smollm2-135m)}
RECORDS=${RECORDS:-editflow/assets/counterfact/records.json,../shared/data/zsre/zsre_sample.json}
exec "$PY" benchmarks/lifelong.py --model "$MODEL" --versions "${VERSIONS:-9}" --facts "${FACTS:-100}" \
  --offset "${OFFSET:-12}" --records "$RECORDS" --ways lineage --fluency
