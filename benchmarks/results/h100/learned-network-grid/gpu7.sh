cp -r src/risloc/weights .snap/old/src/risloc/
nvidia-smi --query-gpu=name --format=csv,noheader
md5sum src/risloc/nn/inference.py src/risloc/estimators/ml.py src/risloc/crb.py
for v in new old; do
  if [ $v = old ]; then export PYTHONPATH=$PWD/.snap/old/src; else export PYTHONPATH=$PWD/src; fi
  timeout 200 python3 .snap/ab_h100.py $v $OUT/ab_$v.json 2>&1 | tail -3
done
export PYTHONPATH=$PWD/src
timeout 120 python3 -m pytest -p no:cacheprovider tests/test_nn_inference.py tests/test_ml.py tests/test_cuda_graphs.py -k "cuda or graph or measured or refinements" 2>&1 | tail -2
