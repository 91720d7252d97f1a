# Run from the repository root: bash benchmarks/results/h100/learned-network-grid/run.sh  (OUT: where the files go, default out/)
set -e
HERE=$(dirname "$0"); OUT=${OUT:-out}; mkdir -p "$OUT"
# OLD_SRC: the src/ folder of a checkout of commit ae5320b (e.g. git worktree add ../old ae5320b; OLD_SRC=../old/src)
nvidia-smi --query-gpu=name --format=csv,noheader
md5sum src/risloc/nn/inference.py src/risloc/estimators/ml.py src/risloc/crb.py
for v in new old; do
  if [ $v = old ]; then export PYTHONPATH=$OLD_SRC; else export PYTHONPATH=$PWD/src; fi
  python3 "$HERE/ab_h100.py" $v "$OUT/ab_$v.json"
done
export PYTHONPATH=$PWD/src
python3 -m pytest -p no:cacheprovider tests/test_nn_inference.py tests/test_ml.py tests/test_cuda_graphs.py -k "cuda or graph or measured or refinements"
