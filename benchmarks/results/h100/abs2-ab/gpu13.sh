export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader
md5sum src/risloc/grids.py src/risloc/nn/networks/spectrum.py src/risloc/estimators/ml.py
timeout 300 python3 .snap/ab4_h100.py $OUT/ab4.json 2>&1 | tail -7
timeout 150 python3 -m pytest -p no:cacheprovider tests/test_nn_spectrum.py tests/test_grids.py tests/test_cuda_graphs.py -x 2>&1 | tail -1
