"""``torch.compile`` on the packaged network (CUDA only): speed and agreement with eager float32.

    PYTHONPATH=src python3 benchmarks/bench_learned_compile.py OUT.json

On 4 batches of 1 024 and of 4 096 scenes of the validation seed 1000: scenes/s of the eager
float32 forward, of the matched-filter front end eager and under ``torch.compile`` (and the
largest difference of its spectra), of the whole network under ``torch.compile`` in float32
and under bf16 autocast, and the largest differences of the compiled network's K logits and
detection azimuths from the eager ones. ``first_call_s`` includes the compilation.
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
res = {}
for B in (1024, 4096):
    scenes = risloc.simulate(sc, B * 4, seed=1000, device=dev)
    batches = [scenes[a:a + B] for a in range(0, len(scenes), B)]
    inps = [prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=options.regularisation) for s in batches]
    def rate(fn, tag):
        with torch.no_grad():
            t0 = time.perf_counter(); out = fn(inps[0]); torch.cuda.synchronize(); tw = time.perf_counter() - t0
            t = time.perf_counter()
            for x in inps: o = fn(x)
            torch.cuda.synchronize()
            r = len(scenes) / (time.perf_counter() - t)
        res[f"{tag}_b{B}"] = {"scenes_per_s": round(r), "first_call_s": round(tw, 1)}
        print(tag, B, res[f"{tag}_b{B}"], flush=True)
        return out
    ref = rate(lambda x: model(x, options), "eager_fp32")
    # front end alone eager and compiled
    grid = model.grid(dev)
    fe = lambda x: spm.matched_filter_spectra(x.y, x.H, x.codes, grid, picks=model.cfg.pursuit)
    rate(fe, "frontend_eager")
    fec = torch.compile(spm.matched_filter_spectra, dynamic=False)
    a = rate(lambda x: fec(x.y, x.H, x.codes, grid, picks=model.cfg.pursuit), "frontend_compiled")
    b = fe(inps[0])
    res[f"frontend_maxdiff_b{B}"] = float((a.S - b.S).abs().max())
    # whole model compiled
    try:
        mc = torch.compile(model, dynamic=False)
        out = rate(lambda x: mc(x, options), "model_compiled")
        res[f"model_compiled_logit_diff_b{B}"] = float((out.k_logits - ref.k_logits).abs().max())
        res[f"model_compiled_phi_diff_b{B}"] = float((out.detections.phi - ref.detections.phi).abs().max())
    except Exception as e:
        res[f"model_compiled_error_b{B}"] = repr(e)[:500]; print(e)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = rate(lambda x: mc(x, options), "model_compiled_bf16")
    except Exception as e:
        res[f"model_compiled_bf16_error_b{B}"] = repr(e)[:500]; print(e)
    torch._dynamo.reset()
atomic_write_text(sys.argv[1], json.dumps(res, indent=1))
