# Run from the repository root: bash benchmarks/results/h100/abs2-ab/run.sh  (OUT: where the files go, default out/)
set -e
HERE=$(dirname "$0"); OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader
md5sum src/risloc/grids.py src/risloc/nn/networks/spectrum.py src/risloc/estimators/ml.py
python3 "$HERE/ab4_h100.py" "$OUT/ab4.json"
python3 -m pytest -p no:cacheprovider tests/test_nn_spectrum.py tests/test_grids.py tests/test_cuda_graphs.py -x
