cp -r src/risloc/weights .snap/prev/src/risloc/
nvidia-smi --query-gpu=name --format=csv,noheader
md5sum src/risloc/estimators/ml.py src/risloc/estimators/ml_core.py .snap/prev/src/risloc/estimators/ml.py
for r in 1 2 3; do
  for v in new prev; do
    if [ $v = prev ]; then export PYTHONPATH=$PWD/.snap/prev/src; else export PYTHONPATH=$PWD/src; fi
    timeout 100 python3 .snap/ab3_h100.py $v $OUT/ab3_${v}_$r.json 2>&1 | tail -1
  done
done
