#!/usr/bin/env bash
# The one prepared device check of pertscale's GPU path (issue 14).
#
#   bash bench/gpu_check.sh            on the lent GPU machine, from the repository root, with
#                                      .whl carried (the wheels the device lacks); < 8 minutes
#   bash bench/gpu_check.sh --dry-run  here, on a CPU: the very same steps at tiny sizes (fp32)
#   bash bench/gpu_check.sh --wheels   here: fill .whl/ with the wheels the device lacks
#
# Steps: install the carried wheels; print the environment; the GPU tests
# (pytest -m gpu tests/gpu); the train-step benchmark (`pertscale bench train --mode step`,
# packed varlen vs padded sdpa, bf16, no peer) at d512/L12 and d1024/L24; one table (config,
# layout, real tokens/s, MFU, peak memory, packed/padded) and $OUT/gpu_check.json (OUT defaults
# to ./.gpu_check). Every step runs even when one before it failed (a device run is scarce);
# the exit status is non-zero when any step failed, and a line names each failed step.
#
# Python: python3 on the device (the one that holds torch); for --dry-run, $PYTHON when set,
# else .venv/bin/python (the project's venv), else python3. GPU_TESTS_DIR (default tests/gpu)
# names the folder of GPU tests.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

MODE=device
case "${1:-}" in
    "") ;;
    --dry-run) MODE=dry-run ;;
    --wheels) MODE=wheels ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (--dry-run, --wheels or none)" >&2; exit 2 ;;
esac

# --- what the device lacks (KINDS.md's package list for nvidia-h100-x1/nvidia-h200) -----------
# The imports of the GPU tests and the step benchmark (pertscale.models.*, .data.tokenizer,
# .training.engine/.flops, deepspeed) need these beyond the device's packages; each is
# carried at the version in .venv. deepspeed has no wheel on PyPI: it is built here
# (DS_BUILD_OPS=0: pure Python; its ops JIT-build on the device, which has nvcc and ninja).
# pandas: the device's may be 3.x; anndata (imported by pertscale.data) wants < 3, as .venv has.
CARRY=(
    hjson pydantic pydantic-core annotated-types typing-inspection
    anndata array-api-compat legacy-api-wrap natsort scverse-misc pandas pytz tzdata
    zarr donfig google-crc32c numcodecs
)
WHEEL_PLATFORMS=(--only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64)

build_wheels() {
    local py=.venv/bin/python
    if [ ! -x "$py" ]; then
        echo "gpu_check --wheels: no $py; run 'make venv' first" >&2
        return 1
    fi
    local pins=() name version
    version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
    for name in "${CARRY[@]}"; do
        version=$(version "$name") || { echo "gpu_check --wheels: $name is not in .venv" >&2; return 1; }
        pins+=("$name==$version")
    done
    mkdir -p .whl
    rm -f .whl/*.whl
    echo "== deepspeed==$(version deepspeed): wheel built here (DS_BUILD_OPS=0)"
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl \
        "deepspeed==$(version deepspeed)" || return 1
    echo "== downloading ${pins[*]}"
    "$py" -m pip download -q --no-deps "${WHEEL_PLATFORMS[@]}" -d .whl "${pins[@]}" || return 1
    du -b .whl/*.whl | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2; total += $1}
                            END {printf "%8.2f MiB  total\n", total / 1048576}'
}

if [ "$MODE" = wheels ]; then
    build_wheels || { echo "gpu_check: FAILED: --wheels" >&2; exit 1; }
    exit 0
fi

# --- the check --------------------------------------------------------------------------------
OUT=${OUT:-$PWD/.gpu_check}
mkdir -p "$OUT" || exit 1
rm -f "$OUT"/gpu_check.log "$OUT"/gpu_check.json "$OUT"/steps.tsv "$OUT"/env.json \
    "$OUT"/pytest.log "$OUT"/step_*.json
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [ "$MODE" = dry-run ]; then
    if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
    elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
    else PY=python3; fi
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=2
    SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    trap 'rm -rf "$SITE"' EXIT
    DEVICE=(--device=cpu --precision=fp32 --threads=2)
    # name  d_model n_layers n_heads d_ff batch max_seq_len median_genes n_genes steps warmup
    CONFIGS=("d64-L2 64 2 4 256 4 128 40 500 2 1" "d128-L2 128 2 4 512 3 160 60 500 2 1")
    INSTALL_LIMIT=120 TESTS_LIMIT=300 BENCH_LIMIT=120
else
    PY=python3
    export DS_ACCELERATOR=cuda OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    SITE=/tmp/site
    DEVICE=(--device=cuda --precision=bf16 --threads=8)
    # d_ff = 4 x d_model, the usual transformer ratio and the one MFU figures elsewhere assume
    # (scGPT's own 512-wide model uses d_ff = 512: less matmul per token, a lower MFU). Cells
    # of ~1500 expressed genes (lognormal, sigma 0.6) cut at 3000 tokens: ~45% of a padded
    # batch is padding. Batch sizes: a step saves ~24 KiB of bf16 activations per token per
    # layer at width 1024 (measured here with saved-tensor hooks), so the padded d1024/L24 step
    # holds ~56 GiB at 32 x 3000 tokens (d512/L12 at 64 x 3000: ~29 GiB): inside an H200's
    # 139 GiB, and an H100's 80 GB. Each contender gets a few seconds of timed steps.
    CONFIGS=("d512-L12 512 12 8 2048 64 3000 1500 20000 10 3"
             "d1024-L24 1024 24 16 4096 32 3000 1500 20000 8 2")
    INSTALL_LIMIT=90 TESTS_LIMIT=180 BENCH_LIMIT=110
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}

FAILED=()
# run_step NAME LIMIT_S COMMAND...: one step, its status and seconds in $OUT/steps.tsv.
run_step() {
    local name=$1 limit=$2 rc=0 status=ok start=$SECONDS
    shift 2
    echo "== $name"
    STEP_DETAIL=""
    "$@" || rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="failed (timed out after $limit s)"
    elif [ "$rc" -ne 0 ]; then status="failed (exit $rc)"; fi
    [ "$status" = ok ] || FAILED+=("$name: $status")
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$STEP_DETAIL" \
        >>"$OUT/steps.tsv"
    echo "== $name: $status ($((SECONDS - start)) s)"
}

install_wheels() {
    local wheels=(.whl/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        if [ "$MODE" = dry-run ]; then
            STEP_DETAIL="skipped: no .whl/ (the installed packages are used)"
            echo "$STEP_DETAIL"
            return 0
        fi
        echo "no wheels in .whl/: run 'bash bench/gpu_check.sh --wheels' here and carry .whl"
        return 1
    fi
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        # NOTE: the wheels are the device's (cp312); a dry run on another Python uses its own.
        STEP_DETAIL="skipped: $("$PY" -V 2>&1) here, the wheels are for Python 3.12"
        echo "$STEP_DETAIL"
        [ "$MODE" = dry-run ]
        return
    fi
    timeout -k 10 "$INSTALL_LIMIT" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || return $?
    export PYTHONPATH=$SITE:$PWD
    STEP_DETAIL="${#wheels[@]} wheels into $SITE"
    echo "$STEP_DETAIL"
}

# The environment, and every import the later steps need, so a missing package fails here.
show_env() {
    timeout -k 10 120 "$PY" - "$OUT/env.json" "$MODE" <<'EOF'
import json, platform, sys
import torch
import deepspeed
import pertscale.bench.step, pertscale.models, pertscale.training.engine, pertscale.training.flops
cuda = torch.cuda.is_available()
env = {"python": platform.python_version(), "torch": torch.__version__,
       "deepspeed": deepspeed.__version__, "cuda": torch.version.cuda,
       "device_name": torch.cuda.get_device_name() if cuda else "cpu",
       "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
       if cuda else None, "accelerator": deepspeed.get_accelerator().device_name()}
print(json.dumps(env))
open(sys.argv[1], "w").write(json.dumps(env, indent=2))
if sys.argv[2] == "device" and not cuda:
    sys.exit("gpu_check: torch sees no CUDA device")
EOF
}

gpu_tests() {
    local dir=${GPU_TESTS_DIR:-tests/gpu}
    if [ ! -d "$dir" ]; then
        STEP_DETAIL="no gpu tests ($dir is absent)"
        echo "$STEP_DETAIL"
        return 0
    fi
    local rc=0
    timeout -k 10 "$TESTS_LIMIT" "$PY" -m pytest -m gpu "$dir" -q -p no:cacheprovider \
        2>&1 | tee "$OUT/pytest.log" || rc=$?
    local summary
    summary=$(grep -v '^\s*$' "$OUT/pytest.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
    case $rc in
        0) STEP_DETAIL=$summary ;;
        5) STEP_DETAIL="no gpu tests (pytest collected none: $summary)"; rc=0 ;;
        124|137) STEP_DETAIL="timed out after $TESTS_LIMIT s" ;;
        *) STEP_DETAIL="failed (pytest exit $rc): $summary" ;;
    esac
    echo "gpu tests: $STEP_DETAIL"
    return "$rc"
}

bench() {
    local name=$1 d=$2 layers=$3 heads=$4 ff=$5 batch=$6 seq=$7 genes=$8 vocab=$9
    local steps=${10} warmup=${11}
    timeout -k 10 "$BENCH_LIMIT" "$PY" -m pertscale bench train --mode=step "${DEVICE[@]}" \
        --flavor=small --d_model="$d" --n_layers="$layers" --n_heads="$heads" --d_ff="$ff" \
        --batch_size="$batch" --max_seq_len="$seq" --median_genes="$genes" --n_genes="$vocab" \
        --steps="$steps" --warmup="$warmup" --peer_path= --out="$OUT/step_$name.json"
}

echo "gpu_check: $MODE, python $PY, OUT=$OUT"
run_step install "$INSTALL_LIMIT" install_wheels
run_step env 120 show_env
run_step gpu_tests "$TESTS_LIMIT" gpu_tests
names=()
for config in "${CONFIGS[@]}"; do
    read -r -a fields <<<"$config"
    names+=("${fields[0]}")
    run_step "bench_${fields[0]}" "$BENCH_LIMIT" bench "${fields[@]}"
done
table_args=(--out "$OUT" --configs "$(IFS=,; echo "${names[*]}")")
[ "$MODE" = dry-run ] && table_args+=(--dry-run)
echo "== table"
"$PY" -m pertscale.bench.gpu_table "${table_args[@]}" || FAILED+=("table: failed (exit $?)")

if [ "${#FAILED[@]}" -gt 0 ]; then
    for failure in "${FAILED[@]}"; do echo "gpu_check: FAILED: $failure"; done
    exit 1
fi
echo "gpu_check: all steps passed"
