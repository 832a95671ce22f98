#!/usr/bin/env bash
# The GPU check of certnas, as one short script for a lent CUDA machine (see README, "GPU").
# Runs the defaults with --device cuda and times the benchmarks there; results go to $OUT (or ./device-out).
# Extra Python packages the machine lacks (auto-LiRPA, mlxtend, onnx2torch, pyautoattack) are read from
# ${CERTNAS_EXTRA_SITE:-.gpu_site} when that folder exists.
set -u
OUT="${OUT:-device-out}"; mkdir -p "$OUT"
SITE="${CERTNAS_EXTRA_SITE:-.gpu_site}"
export PYTHONPATH="$PWD${SITE:+:$PWD/$SITE}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
W=/tmp/certnas-device; rm -rf "$W"; mkdir -p "$W"
log() { echo "== $(date +%T) $*"; }
{
log "environment"
nvidia-smi -L
$PY -c "import verifiers.lirpa, torch, certnas; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
log "bench_verify on cuda (trained default model if given)"
timeout 120 $PY -m benchmarks.bench_verify --device cuda ${CERTNAS_MODEL:+--model $CERTNAS_MODEL} --n 32 --crown-n 32 --alpha-n 8 --milp-n 0 --out "$OUT/bench_verify_cuda.json"
log "certnas train --mode ibp --device cuda (the default certified training)"
/usr/bin/time -f "train wall %e s" timeout 200 $PY -m certnas.cli train --mode ibp --device cuda --out "$W/train" --force
cp "$W/train/history.csv" "$OUT/train_history.csv" 2>/dev/null; cp "$W/train/summary.json" "$OUT/train_summary.json" 2>/dev/null
log "certnas verify on cuda"
timeout 150 $PY -m certnas.cli verify "$W/train/model.pt" --eps 0.1 --n 100 --device cuda --method ibp,crown-ibp,crown,alpha-crown --out "$W/verify"
cp "$W/verify/verify.json" "$OUT/verify.json" 2>/dev/null
log "certnas search --metric clb --device cuda (the default search)"
/usr/bin/time -f "search wall %e s" timeout 120 $PY -m certnas.cli search --metric clb --device cuda --out "$W/search" --force
cp "$W/search/history.csv" "$OUT/search_history.csv" 2>/dev/null
log "bench_train on cuda"
timeout 60 $PY -m benchmarks.bench_train --device cuda --repeats 5 --no-memory --out "$OUT/bench_train_cuda.json"
log "done"
} 2>&1 | tee "$OUT/log.txt"
