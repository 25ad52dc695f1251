#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one short run (a lent GPU is counted in minutes):
#   1. bench/speed.py --gpu-only: torch CUDA FP32, FP16 + CUDA graphs (and ONNX Runtime CUDA where its GPU
#      build is installed), alone on the GPU so the figures are clean;
#   2. the GPU tests (conformance torch:cuda, training on CUDA);
#   3. EfficientAD-S --preset paper on Magnetic Tile, up to 70,000 steps inside the time left (the run
#      stops at its budget and says so), evaluated on the test split;
#   4. beside it, the learning curve of the quick preset on the same data (more steps than a CPU affords).
# Results go to $OUT (at most 8 files): log.txt, speed.json, pytest.txt, accuracy-*.json, the paper bundle
# (bundle.tgz.NN, without model.onnx: `edge-ad export` remakes it).
#
#   OUT=/tmp/out DATA=.gpudata/magnetic_tile BUDGET=560 bash bench/gpu_lease.sh
set -u
BUDGET=${BUDGET:-560}            # seconds this script may take in all
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
source "$(dirname "$0")/gpu_common.sh"
python3 - >>"$OUT/log.txt" 2>&1 <<'EOF'
import torch, onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("onnxruntime", ort.__version__, ort.get_available_providers())
EOF

# 1. speed, alone on the GPU
log "speed: begin"
timeout $(( $(left) / 5 )) python3 bench/speed.py --gpu-only --models efficientad-s,gaussian,fader \
  --batches 1,8,32 --seconds 1.5 --rounds 1 --work "$WORK/speed" --out "$WORK/speed-out" \
  >>"$OUT/log.txt" 2>&1
cp "$WORK/speed-out/speed.json" "$OUT/speed.json" 2>/dev/null
cat "$WORK/speed-out/speed.txt" >>"$OUT/log.txt" 2>/dev/null
log "speed: end"

# 3. the paper preset, stopped by the clock at the latest 90 s before the end (calibration, eval, packing)
PAPER_MIN=$(python3 -c "print(max(0.5, ($(left) - 90) / 60.0))")
log "paper: EfficientAD-S up to 70000 steps, budget ${PAPER_MIN} min"
python3 bench/accuracy.py --data "$DATA" --models efficientad-s --preset paper --device cuda \
  --backend torch --eval-device cuda --max-minutes "$PAPER_MIN" --checkpoint-every 20000 --work "$WORK/acc" --tag gpu \
  --results "$OUT/accuracy-paper.json" >"$WORK/paper.log" 2>&1 &
PAPER=$!

# 2. tests, then 4. quick-preset learning curve, beside the paper run
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_backends.py tests/test_train.py \
  tests/test_tensorrt.py -k "cuda or real_engine" >"$OUT/pytest.txt" 2>&1
log "pytest: $(tail -1 "$OUT/pytest.txt")"
for spec in "1200 3e-4" "5000 3e-4"; do
  read -r steps lr <<<"$spec"
  [ "$(left)" -gt 150 ] || break
  log "quick curve: $steps steps, lr $lr"
  python3 bench/accuracy.py --data "$DATA" --models efficientad-s --preset quick --steps "$steps" --lr "$lr" \
    --device cuda --backend torch --eval-device cuda --max-minutes 2.5 --checkpoint-every 100000 --work "$WORK/acc" --tag "gpu-$steps" \
    --results "$OUT/accuracy-quick.json" >>"$WORK/quick.log" 2>&1
  log "quick curve: $steps steps done"
done

wait $PAPER
log "paper: exit $?"
tail -5 "$WORK/paper.log" >>"$OUT/log.txt"
grep -E "^\{|time budget" "$WORK/quick.log" "$WORK/paper.log" >>"$OUT/log.txt" 2>/dev/null
B="$WORK/acc/efficientad-s-paper-gpu"
if [ -d "$B" ]; then
  tar -C "$WORK/acc" --exclude=model.onnx --exclude=train_state.pt -czf "$WORK/bundle.tgz" efficientad-s-paper-gpu
  split -b 15m -d "$WORK/bundle.tgz" "$OUT/bundle.tgz."
  log "bundle: $(du -h "$WORK/bundle.tgz" | cut -f1) in $(find "$OUT" -name "bundle.tgz.*" | wc -l) parts"
fi
log "done"
