#!/usr/bin/env bash
# EfficientAD-S teachers and the penalty term on a lent GPU, in one short run. Beside each other:
#   0. the GPU tests (conformance torch:cuda, training on CUDA);
#   1. generic (dead-leaves) images, the offline stand-in for ImageNet (edge-ad generic-images);
#   2. R1: the Lite0 teacher with the penalty term on the generic images;
#   3. R2 / R3: a PDN-S teacher distilled from Lite0 (edge-ad distill-teacher) on the generic images alone
#      (R2) or on generic + the category's normal images (R3), then EfficientAD-S with it and the penalty.
# Every training stops at its time budget and still writes its bundle; each is evaluated on the test split.
# Results go to $OUT: log.txt, pytest.txt, accuracy.json, the teachers (teacher-*.pth) and the best bundle
# (best.tgz.NN, without model.onnx: `edge-ad export` remakes it).
#
#   OUT=/tmp/out DATA=.gpudata/magnetic_tile BUDGET=540 bash bench/gpu_teacher.sh
# A dry run on a CPU: DEVICE=cpu GEN=40 DISTILL_BATCH=2 BUDGET=300 TESTS=0 bash bench/gpu_teacher.sh
set -u
BUDGET=${BUDGET:-540}            # seconds this script may take in all
DEVICE=${DEVICE:-cuda}
GEN=${GEN:-6000}                 # generic images (8 shards)
DISTILL_BATCH=${DISTILL_BATCH:-16}
TESTS=${TESTS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
source "$(dirname "$0")/gpu_common.sh"
mins() { python3 -c "print(round(max(0.3, $1 / 60.0), 2))"; }
ACC=(python3 bench/accuracy.py --data "$DATA" --models efficientad-s --preset paper --device "$DEVICE"
     --backend torch --eval-device "$DEVICE" --checkpoint-every 1000000 --work "$WORK/acc"
     --results "$OUT/accuracy.json")

if [ "$TESTS" = 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_backends.py tests/test_train.py \
    -k "cuda" >"$OUT/pytest.txt" 2>&1 &
fi

# 1. generic images, 8 shards in parallel (each a function of its seed)
GEN_PIDS=()
for s in 0 1 2 3 4 5 6 7; do
  python3 -m edge_ad generic-images --out "$WORK/generic/s$s" --count $(( GEN / 8 )) --seed "$s" \
    >"$WORK/gen$s.log" 2>&1 &
  GEN_PIDS+=($!)
done
wait "${GEN_PIDS[@]}"
log "generic images: $(find "$WORK/generic" -name '*.jpg' | wc -l)"
GDIRS=()
for s in 0 1 2 3 4 5 6 7; do GDIRS+=(--distill-data "$WORK/generic/s$s"); done

# the time left after the distillation goes to EfficientAD; 100 s stay for calibration, evaluation, packing
DIST_S=$(( ($(left) - 100) * 2 / 5 ))
TRAIN_S=$(( $(left) - 100 - DIST_S - 15 ))
log "R1 Lite0 + penalty: $(mins $(( DIST_S + TRAIN_S ))) min; R2/R3 distill $(mins $DIST_S) min, then $(mins $TRAIN_S) min"
"${ACC[@]}" --tag r1-lite0-penalty --penalty-dir "$WORK/generic/s0" --max-minutes "$(mins $(( DIST_S + TRAIN_S )))" \
  >"$WORK/r1.log" 2>&1 &
"${ACC[@]}" --tag r2-pdn-generic --penalty-dir "$WORK/generic/s0" --max-minutes "$(mins $TRAIN_S)" \
  --distill-steps 60000 --distill-batch "$DISTILL_BATCH" --distill-minutes "$(mins $DIST_S)" "${GDIRS[@]}" \
  >"$WORK/r2.log" 2>&1 &
"${ACC[@]}" --tag r3-pdn-mixed --penalty-dir "$WORK/generic/s0" --max-minutes "$(mins $TRAIN_S)" \
  --distill-steps 60000 --distill-batch "$DISTILL_BATCH" --distill-minutes "$(mins $DIST_S)" "${GDIRS[@]}" \
  --distill-data "$DATA/train/good" >"$WORK/r3.log" 2>&1 &
wait
log "runs done; pytest: $(tail -1 "$OUT/pytest.txt" 2>/dev/null)"
for r in r1 r2 r3; do
  { echo "== $r"
    grep -E "^\{|distilled|time budget|Error|error" "$WORK/$r.log" | cut -c1-1500
    tail -3 "$WORK/$r.log"; } >>"$OUT/log.txt"
done
cp "$WORK"/acc/teacher-*.pth "$OUT/" 2>/dev/null
BEST=$(python3 - "$OUT/accuracy.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except Exception:
    sys.exit(0)
print(max(rows, key=lambda k: rows[k]["image_auroc"]) if rows else "")
EOF
)
if [ -n "$BEST" ] && [ -d "$WORK/acc/$BEST" ]; then
  tar -C "$WORK/acc" --exclude=model.onnx --exclude=train_state.pt -czf "$WORK/best.tgz" "$BEST"
  split -b 15m -d "$WORK/best.tgz" "$OUT/best.tgz."
  log "best bundle $BEST: $(du -h "$WORK/best.tgz" | cut -f1)"
fi
log "done"
