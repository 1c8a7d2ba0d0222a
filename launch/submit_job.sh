#!/usr/bin/env bash
# Submit `pertscale pretrain` to a running Ray cluster as a Ray job (the driver runs on the
# head node; workers get DS_ACCELERATOR / OMP_NUM_THREADS from the job's runtime env).
#   RAY_ADDRESS=http://head:8265 launch/submit_job.sh --data.store_uri=s3://bucket/store
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
CONFIG="${PERTSCALE_CONFIG:-configs/scgpt_small.toml}"
RAY="${RAY:-.venv/bin/ray}"

"$RAY" job submit --working-dir . \
  --runtime-env-json="{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"${MLFLOW_TRACKING_URI:-}\", \"PERTSCALE_STORAGE\": \"${PERTSCALE_STORAGE:-/mnt/pertscale}\"}}" \
  -- python -m pertscale pretrain --config "$CONFIG" --address=auto --no-progress "$@"
