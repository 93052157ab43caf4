#!/usr/bin/env bash
# The prepared GPU measurement: one call on one GPU (about 8 minutes on an H100), records to OUT.
#
#   bash benchmarks/gpu.sh OUT [--tiny]
#
# 1. env.json: device, torch/torchvision/timm versions.
# 2. cub.json/.md: every ViT-S method (random init: no hub on the machine), model step against the
#    plain timm loop, the data path stage by stage for the legacy, cpu and device pipelines, pipeline
#    and end-to-end img/s on a generated CUB-shaped folder (200 classes x 60 JPEGs of 500x375), syncs
#    per step (torch.cuda.set_sync_debug_mode), and exact MAP@R of 60,000 x 384.
# 3. sop.json/.md: a SOP-shaped folder (a tenth of SOP's classes, sides 256-640) with the pixel cache
#    off, so the device pipeline decodes every batch with nvJPEG, as on the full SOP.
# 4. concurrency.json/.md: a shrunk peft_vit_s (its 7 methods, 2 trials x 1 epoch each, on the CUB-shaped
#    folder) with K = 1, 2, 4 concurrent trials on the GPU.
# 5. decode.json: nvJPEG pixels against libjpeg-turbo's on the CUB-shaped folder (max/mean difference).
#
# Runs on the lent machines' own image (python3 with torch, timm, torchvision, peft): what it lacks
# (mlflow-skinny, optuna, ...) travels as wheels in .whl/, made by benchmarks/wheels.sh (carry .whl).
# --tiny: the same steps at toy sizes, on whatever device there is (the test suite runs it on CPU).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu.sh OUT [--tiny]}
TINY=0
[ "${2:-}" = "--tiny" ] && TINY=1
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
if ! "$PY" -c "import mlflow, optuna" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dmlbench-site .whl/*.whl \
      || { echo "gpu.sh: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/dmlbench-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu.sh: mlflow/optuna missing and no .whl/: run bash benchmarks/wheels.sh where PyPI is reachable" >&2
    exit 2
  fi
fi
WORK=${DMLBENCH_BENCH_WORKDIR:-/tmp/dmlbench-bench}
mkdir -p "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI=sqlite:///$WORK/unused.db
DML=("$PY" -m harness.cli)
VIT=vit_small_patch16_224
METHODS=$("$PY" -c "from harness.core.registry import method_names, get_method
print(','.join(m for m in method_names() if get_method(m).applies_to('vit') and m != 'frpt_bbox'))")
STUDY=full_finetune,linear_probe,bitfit,adapter,vpt_shallow,vpt_deep,vptsp_g
if [ $TINY = 1 ]; then
  METHODS=${TINY_METHODS:-bitfit,vpt_deep}; STUDY=$METHODS
  SIZE=(--image-size 32 --batch-size 16 --steps 2 --warmup 1 --set 'model.backbone_kwargs={"depth":2}')
  CUB=(--folder cub --folder-scale 0.02 --folder-size 96x72 --workers 0)
  SOP=(--folder sop --folder-scale 0.002 --folder-size 64x64 --workers 0)
  EVAL=2000x64; KS=1,2; LIMIT=600
else
  SIZE=(--image-size 224 --batch-size 64 --steps 20 --warmup 5)
  CUB=(--folder cub --workers 8)
  SOP=(--folder sop --folder-scale 0.1 --workers 8)
  EVAL=60000x384; KS=1,2,4; LIMIT=420
fi
status=0
step() {  # name, then the command: each step is time-limited and fails alone
  local name=$1; shift
  echo "== $name ($(date +%T))"
  timeout "$LIMIT" "$@" || { echo "gpu.sh: step $name failed or ran out of time" >&2; status=1; }
}
step env "$PY" -c "import json, torch, torchvision, timm, sys
d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
json.dump({'device': d, 'torch': torch.__version__, 'torchvision': torchvision.__version__, 'timm': timm.__version__,
           'python': sys.version.split()[0]}, open('$OUT/env.json', 'w'), indent=1)"
step cub "${DML[@]}" benchmark --methods "$METHODS" --backbone $VIT "${SIZE[@]}" "${CUB[@]}" --baseline \
  --end-to-end --pipelines legacy,cpu,device --eval-size $EVAL --workdir "$WORK" --out "$OUT/cub"
step sop "${DML[@]}" benchmark --methods full_finetune,bitfit --backbone $VIT "${SIZE[@]}" "${SOP[@]}" \
  --end-to-end --pipelines cpu,device --set data.pixel_cache_gb=0 --workdir "$WORK" --out "$OUT/sop"
step concurrency "${DML[@]}" benchmark --methods bitfit --backbone $VIT "${SIZE[@]}" "${CUB[@]}" \
  --folder-scale "$([ $TINY = 1 ] && echo 0.02 || echo 0.5)" --concurrent $KS --study-methods "$STUDY" \
  --study-trials 2 --study-epochs 1 --workdir "$WORK" --out "$OUT/concurrency"
step decode "$PY" -m harness.bench.decode_check "$WORK" "$OUT/decode.json"
for part in cub sop concurrency; do  # one summary: the device tool brings back at most 8 files
  [ -f "$OUT/$part/benchmark.md" ] && { echo "## $part"; cat "$OUT/$part/benchmark.md"; rm "$OUT/$part/benchmark.md"; }
done > "$OUT/summary.md"
[ -f "$OUT/decode.json" ] && { echo "## decode"; cat "$OUT/decode.json"; } >> "$OUT/summary.md"
cat "$OUT/summary.md"
exit $status
