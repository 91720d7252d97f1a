# Run from the repository root: bash benchmarks/results/h100/maps-and-grid-ab/run.sh  (OUT: where the files go, default out/)
set -e
HERE=$(dirname "$0"); OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader
md5sum src/risloc/nn/inference.py src/risloc/estimators/ml.py src/risloc/estimators/ml_core.py
python3 "$HERE/ab2_h100.py" "$OUT/ab2.json"
python3 -m pytest -p no:cacheprovider tests/test_ml.py tests/test_cuda_graphs.py tests/test_nn_inference.py tests/test_estimators_contract.py -x
