"""Where the packaged network's time goes on CUDA: the forward with and without cuDNN's autotuner,
and the CUDA kernels of the matched-filter front end and of one forward (torch profiler).

    PYTHONPATH=src python3 benchmarks/profile_learned_network.py OUT.json

On 8 192 scenes of the validation seed 1000 in batches of 1 024 and 4 096: scenes/s of the
float32 forward with ``torch.backends.cudnn.benchmark`` off, on, off again; then the 20 most
expensive kernels of the front end on 1 024 scenes and the 25 of one forward on 4 096.
"""
import json
import sys
import time

import torch
import risloc
from risloc._files import atomic_write_text
from risloc.nn.inference import DEFAULT_WEIGHTS, load_model
from risloc.nn.inputs import prepare_inputs
from risloc.nn.networks import spectrum as spm
dev = torch.device("cuda")
loaded = load_model(DEFAULT_WEIGHTS, device=dev)
model, options = loaded.model, loaded.options
sc = loaded.config.scenario
res = {"benchmark_default": torch.backends.cudnn.benchmark}
for B in (1024, 4096):
    scenes = risloc.simulate(sc, 8192, seed=1000, device=dev)
    inps = [prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=options.regularisation) for s in (scenes[a:a + B] for a in range(0, 8192, B))]
    for bm in (False, True, False):
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=bm):
            model(inps[0], options); model(inps[0], options); torch.cuda.synchronize()
            t = time.perf_counter()
            for x in inps: out = model(x, options)
            torch.cuda.synchronize()
        res[f"forward_b{B}_benchmark_{bm}"] = round(8192 / (time.perf_counter() - t))
        print(B, bm, res[f"forward_b{B}_benchmark_{bm}"], flush=True)
grid = model.grid(dev)
x = inps[0]
from torch.profiler import profile, ProfilerActivity
with torch.no_grad():
    spm.matched_filter_spectra(x.y[:1024], x.H[:1024], x.codes[:1024], grid, picks=5); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        spm.matched_filter_spectra(x.y[:1024], x.H[:1024], x.codes[:1024], grid, picks=5); torch.cuda.synchronize()
res["front_end_profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=True):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(inps[0], options); torch.cuda.synchronize()
res["forward_profile_benchmark"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
print(res["front_end_profile"]); print(res["forward_profile_benchmark"])
atomic_write_text(sys.argv[1], json.dumps(res, indent=1))
