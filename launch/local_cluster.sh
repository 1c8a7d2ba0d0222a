#!/usr/bin/env bash
# A 2-node Ray cluster on this machine: a head node and a second node with its own resources,
# then `pertscale pretrain` against it; both nodes stop when the run ends. Cluster knowledge
# only: the training logic lives in the CLI. Workers on a cluster log to an MLflow server (a
# job given --address refuses a sqlite or file tracking URI): without MLFLOW_TRACKING_URI, one
# is started here on the embedded database (storage/mlflow) and stopped with the nodes.
#   launch/local_cluster.sh --data.store_uri=storage/stores/sim [overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."

export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RAY_PORT="${RAY_PORT:-6390}"
MLFLOW_PORT="${MLFLOW_PORT:-5055}"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
CONFIG="${PERTSCALE_CONFIG:-configs/scgpt_debug.toml}"
BIN="${BIN:-.venv/bin}"
TMP_DIR="${RAY_TMP_DIR:-/tmp/pertscale-ray-$RAY_PORT}"
# NOTE: a cluster of this one machine; token auth (on by default for `ray start`) would need
# the token handed to the second node and the driver. Real clusters keep it on.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"

# NOTE: nodes run with --block in the background and are stopped by their own pids, so this
# never touches other Ray clusters on the machine (`ray stop` would stop them all).
pids=()
# wait_port PORT PID WHAT: up to 60 s for a listener, failing at once if PID died
wait_port() {
  for _ in $(seq 120); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "local_cluster.sh: $3 exited before listening on $1" >&2; return 1; }
    sleep 0.5
  done
  echo "local_cluster.sh: $3 is not listening on port $1 after 60 s" >&2
  return 1
}
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT

if [ -z "${MLFLOW_TRACKING_URI:-}" ]; then
  ROOT="$(realpath -m "${PERTSCALE_STORAGE:-storage}")"
  mkdir -p "$ROOT/mlflow"
  "$BIN/mlflow" server --backend-store-uri "sqlite:///$ROOT/mlflow/mlflow.db" \
    --artifacts-destination "$ROOT/mlflow/artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --workers 1 &
  pids+=($!)
  wait_port "$MLFLOW_PORT" "$!" "mlflow server"
  export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
fi

"$BIN/ray" start --head --block --port="$RAY_PORT" --num-cpus="$HEAD_CPUS" \
  --include-dashboard=false --temp-dir="$TMP_DIR" --resources='{"node_head": 1}' &
pids+=($!)
wait_port "$RAY_PORT" "$!" "ray head"  # the head's GCS is up
# The second node: its own raylet and resources on this machine, joining the head.
"$BIN/ray" start --block --address="127.0.0.1:$RAY_PORT" --num-cpus="$WORKER_CPUS" \
  --resources='{"node_second": 1}' &
pids+=($!)
# No wait needed: the trainer's 2 one-CPU workers only fit once the second node has joined.

"$BIN/pertscale" pretrain --config "$CONFIG" --address="127.0.0.1:$RAY_PORT" \
  --trainer.num_workers=2 --trainer.cpus_per_worker=1 "$@"
