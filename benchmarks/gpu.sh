#!/usr/bin/env bash
# The GPU window: one command on a lent GPU machine (15 minutes in all, 10 per command), staged in
# order of value with a cap per stage, the caps summing to 480 s (harness/bench/window.py):
#
#   bash benchmarks/gpu.sh OUT [--dry-run] [--tiny] [--stages smoke,step,...] [--caps stage=s,...]
#
#   smoke        every method built once on the GPU, two steps each (the second with host syncs as
#                errors), a few JPEGs through nvJPEG: if the machine or its image is wrong, only this
#   step         every ViT-S method's step against the plain timm loop (bf16, batch 64, 224 px)
#   e2e          train() on a CUB-shaped folder: full fine-tuning, BitFit, VPTSP-G (memory bank),
#                cpu and device pipelines
#   sop          a SOP-shaped folder, no pixel cache: nvJPEG decodes every batch
#   concurrency  K = 1, 2, 4 concurrent trials of a shrunk study
#   decode       nvJPEG's pixels against libjpeg-turbo's, and which decoder really ran
#   mapr         exact MAP@R of 60,000 x 384
#
# OUT gets records.jsonl (each measurement appended the moment it exists), summary.md (rebuilt
# after every stage) and log.txt. SIGTERM or SIGINT ends every process the script started.
# The lent machines' image has torch, timm, torchvision and peft; mlflow and optuna travel as
# wheels in .whl/ (bash benchmarks/wheels.sh where PyPI is reachable; carry .whl). Without them
# the stages that need them are recorded as skipped and the others run.
# --tiny: toy sizes on whatever device there is (the test suite runs it on the CPU).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu.sh OUT [--dry-run] [--tiny] [--stages a,b] [--caps stage=s,...]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${DMLBENCH_WHEELS:-.whl}
case " $* " in *" --dry-run "*) exec "$PY" -m harness.bench.window "$OUT" "$@" ;; esac
if ! "$PY" -c "import mlflow, optuna" 2>/dev/null; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=${DMLBENCH_SITE:-/tmp/dmlbench-site}
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl; then
      export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
      echo "gpu.sh: installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    else
      echo "gpu.sh: installing $WHEELS failed: the stages that need mlflow or optuna will be skipped" >&2
    fi
  else
    echo "gpu.sh: mlflow/optuna missing and no $WHEELS/: the stages that need them will be skipped" \
      "(bash benchmarks/wheels.sh where PyPI is reachable, then carry .whl)" >&2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///${DMLBENCH_BENCH_WORKDIR:-/tmp/dmlbench-bench}/unused.db}
exec "$PY" -m harness.bench.window "$OUT" "$@"
