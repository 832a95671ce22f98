#!/usr/bin/env bash
# The paper tables' CROWN column on a lent CUDA machine (README, "Full CROWN on the paper networks"):
# full-CROWN radii, on cuda, for the networks of benchmarks/results/cpu-crown, whose search, training and
# IBP / CROWN-IBP stages ran on a CPU. Model files are not committed: carry that folder (with its
# model.pt files) and .gpu_site (auto-LiRPA, mlxtend: see scripts/device_check.sh). Output under $OUT:
# one CROWN bound timed on cuda at batch 1 and 10, the log, and the results folder without model files.
set -u
OUT="${OUT:-device-out}"; mkdir -p "$OUT"
SITE="${CERTNAS_EXTRA_SITE:-.gpu_site}"
export PYTHONPATH="$PWD${SITE:+:$PWD/$SITE}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
RESULTS="${RESULTS:-benchmarks/results/cpu-crown}"
PROFILED="${PROFILED:-$RESULTS/cache/train-77f1067f7431/model.pt}"  # DSRNA-CB, seed 0
log() { echo "== $(date +%T) $*"; }
{
log "environment"
nvidia-smi -L
$PY -c "import verifiers.lirpa, torch, certnas; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
for batch in 1 10; do
  log "one CROWN margin bound on cuda, batch $batch"
  timeout 100 $PY -m benchmarks.crown_profile "$PROFILED" --device cuda --batch "$batch" --show 4 \
    --out "$OUT/crown_profile_cuda_b$batch.json"
done
LEFT=$(( ${DEADLINE_S:-540} - SECONDS ))  # the column gets what is left of the script's deadline
log "the CROWN column (stops after $LEFT s; finished stages are kept)"
timeout "$LEFT" $PY -m benchmarks.paper --scale cpu --seeds 1 --table certified \
  --crown-n "${CROWN_N:-10}" --crown-device cuda --out "$RESULTS" --verbose
log "done (exit $?)"
} 2>&1 | tee "$OUT/log.txt"
tar czf "$OUT/cpu-crown.tgz" --exclude='*.pt' "$RESULTS"
