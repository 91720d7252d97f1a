# Run from the repository root: bash benchmarks/results/h100/scan-traffic-ab/run.sh  (OUT: where the files go, default out/)
set -e
HERE=$(dirname "$0"); OUT=${OUT:-out}; mkdir -p "$OUT"
# OLD_SRC: the src/ folder of a checkout of commit 2e7bfc2 (e.g. git worktree add ../old 2e7bfc2; OLD_SRC=../old/src)
nvidia-smi --query-gpu=name --format=csv,noheader
md5sum src/risloc/estimators/ml.py src/risloc/estimators/ml_core.py "$OLD_SRC/risloc/estimators/ml.py"
for r in 1 2 3; do
  for v in new prev; do
    if [ $v = prev ]; then export PYTHONPATH=$OLD_SRC; else export PYTHONPATH=$PWD/src; fi
    python3 "$HERE/ab3_h100.py" $v "$OUT/ab3_${v}_$r.json"
  done
done
