"""torch.compile (inductor, default mode) of one stochastic likelihood evaluation with derivatives
(risloc.estimators.ml_core.stochastic_eval), one scene, K = 3, on the CPU: its warnings, the
largest differences of (NLL, gradient, Fisher matrix) from the eager call and the median times.

    PYTHONPATH=src python benchmarks/results/cpu/roofline-one-scene/compile_eval.py > compile_eval.log 2>&1
"""
import statistics
import time
import warnings

import torch

import risloc
from risloc.estimators import ml_core

torch.set_num_threads(2)
sc = risloc.Scenario()
scenes = risloc.simulate(sc, 1, seed=5)
g = torch.Generator().manual_seed(0)
phi, theta = 0.5 * torch.rand(1, 3, generator=g), 0.3 * torch.rand(1, 3, generator=g)
rho = 0.1 * torch.rand(1, 3, generator=g) + 0.05
logp, logs, active = torch.zeros(1, 3), torch.full((1,), -2.0), torch.ones(1, 3, dtype=torch.bool)
y, H, _ = ml_core.unit_power(scenes.y.to(torch.complex64), scenes.H.to(torch.complex64))
codes = scenes.codes.to(torch.complex64)
args = (phi, theta, rho, logp, logs, active, y, H, codes)


def f(*a):
    return ml_core.stochastic_eval(*a, sc)


def median_ms(fn, n=200):
    fn(*args)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


with torch.inference_mode():
    ref = f(*args)
    cf = torch.compile(f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.perf_counter()
        out = cf(*args)
        print(f"first compiled call: {time.perf_counter() - t:.1f} s")
    for w in sorted({str(w.message) for w in caught}):
        print("warning:", w)
    for name, a, b in zip(("NLL", "gradient", "Fisher"), ref, out):
        print(f"{name}: largest |compiled - eager| {(a - b).abs().max().item():.3g}, largest |eager| {a.abs().max().item():.3g}")
    print(f"eager {median_ms(f):.3f} ms, compiled {median_ms(cf):.3f} ms per evaluation")
