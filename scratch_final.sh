set -e
export RISLOC_GIT_COMMIT=$(cat .commit)
S=$(cut -c1-7 .commit)
R=$OUT/r; mkdir -p $R
PYTHONPATH=src python3 -m risloc bench --device cuda --scenes 4000 --batch 1024 --seed 1000 --methods learned --no-progress --no-plots --no-order-rules --out $R/val1000-learned-$S > $R/val.log 2>&1
PYTHONPATH=src python3 -m risloc bench --device cuda --scenes 4000 --batch 1024 --oracle-k --no-progress --out $R/bench-heldout-$S > $R/bench.log 2>&1
PYTHONPATH=src python3 -m risloc bench --device cuda --scenes 1000 --batch 1000 --set k_fixed=1 --set snr_db_min=20 --set snr_db_max=20 --no-progress --no-plots --no-order-rules --out $R/bench-heldout-k1-20db-$S > $R/bench_k1.log 2>&1
PYTHONPATH=src python3 benchmarks/bench_learned_speed.py --device cuda --batch 1024 --scenes 8192 --accuracy-scenes 0 --json $R/speed_b1024.json > /dev/null
cd $OUT && tar czf r.tgz r && rm -rf r
echo done
