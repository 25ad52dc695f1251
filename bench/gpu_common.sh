# Sourced by the lent-GPU scripts (bench/gpu_lease.sh, bench/gpu_teacher.sh): the shared prelude.
# Before sourcing, set BUDGET (seconds the script may take in all); OUT, DATA and WORK have defaults.
# Gives: the repository root as working folder, $OUT and $WORK made, `left` (seconds of BUDGET left),
# `log MSG` (timestamped, to the screen and $OUT/log.txt) and the first log line naming GPU and Python.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-/tmp/edge_ad_gpu}
DATA=${DATA:-../shared/data/magnetic_tile}
WORK=${WORK:-/tmp/edge_ad_gpu_work}
mkdir -p "$OUT" "$WORK" || exit 2
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }
export PYTHONUNBUFFERED=1
log "start: $(nvidia-smi -L 2>&1 | head -1); python $(python3 -c 'import sys; print(sys.version.split()[0])')"
