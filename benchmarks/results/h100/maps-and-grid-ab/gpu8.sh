export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader
md5sum src/risloc/nn/inference.py src/risloc/estimators/ml.py src/risloc/estimators/ml_core.py
timeout 400 python3 .snap/ab2_h100.py $OUT/ab2.json 2>&1 | tail -16
timeout 150 python3 -m pytest -p no:cacheprovider tests/test_ml.py tests/test_cuda_graphs.py tests/test_nn_inference.py tests/test_estimators_contract.py -x 2>&1 | tail -2
