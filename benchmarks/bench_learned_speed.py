"""Speed of the shipped learned pipeline, stage by stage, and what each speed choice costs in accuracy.

    PYTHONPATH=src python3 benchmarks/bench_learned_speed.py --device cuda --batch 1024
    PYTHONPATH=src python3 benchmarks/bench_learned_speed.py --device cpu --batch 64 --scenes 128 --accuracy-scenes 0

On simulated default-scenario scenes of ``--seed`` (default: the validation seed 1000) on
``--device``, with the packaged model (or ``--checkpoint``), it times in scenes/s at ``--batch``:
the inputs, the matched-filter front end, the network's forward in float32 and under the
checkpoint's autocast (bf16 on CUDA), the K decision and detections, the MUSIC step on the
detections' effective covariance, the likelihood refinement (``ml`` from the detections,
``LEARNED_REFINE_STEPS``), and ``learned`` / ``learned+ml`` end to end through the registry
(simulation excluded). With ``--accuracy-scenes N`` it scores on N scenes of the same seed the
variants float32/autocast forward x MUSIC step before the refinement or not (refinement only,
no growth step). ``--profile`` adds
the 15 most expensive CUDA kernels of one refinement call. Prints one JSON line (``--json FILE``
also writes it).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import risloc
from risloc._provenance import stamp
from risloc.estimators import get
from risloc.metrics import score
from risloc.nn.inference import DEFAULT_WEIGHTS, LEARNED_GROW, LEARNED_REFINE_STEPS, load_model, run_model
from risloc.nn.inputs import forward, prepare_inputs
from risloc.nn.networks.spectrum import matched_filter_spectra


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(fn, batches, device, warm=1):
    for b in batches[:warm]:
        fn(b)
    _sync(device)
    t = time.perf_counter()
    n = 0
    for b in batches:
        fn(b)
        n += len(b)
    _sync(device)
    return n / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a checkpoint file (default: the packaged model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--scenes", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--accuracy-scenes", type=int, default=4000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    loaded = load_model(args.checkpoint or DEFAULT_WEIGHTS, device=device)
    model, cfg, options, cal = loaded.model, loaded.config, loaded.options, loaded.calibration
    sc = cfg.scenario
    amp = cfg.autocast_dtype(device)
    scenes = risloc.simulate(sc, args.scenes, seed=args.seed, device=device)
    batches = [scenes[a : a + args.batch] for a in range(0, len(scenes), args.batch)]
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "batch": args.batch, "scenes": len(scenes), "autocast": str(amp),
           "provenance": stamp(seed=args.seed, device=device, config=vars(args))}
    inp = lambda s: prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=options.regularisation)
    grid = model.grid(device)
    rates = {}
    with torch.no_grad():
        rates["inputs"] = _rate(inp, batches, device)
        rates["front_end"] = _rate(lambda s: matched_filter_spectra(s.y, s.H, s.codes, grid, picks=cfg.model.pursuit), batches, device)
        rates["forward_float32"] = _rate(lambda s: forward(model, inp(s), options, None), batches, device)
        rates["forward_autocast"] = _rate(lambda s: forward(model, inp(s), options, amp), batches, device)
        kw = dict(options=options, calibration=cal, music_options=dict(cfg.music_options), autocast=amp)
        rates["network_and_detections"] = _rate(lambda s: run_model(model, s, stage="detections", **kw), batches, device)
        rates["network_and_music"] = _rate(lambda s: run_model(model, s, stage="music", **kw), batches, device)
        dets = [run_model(model, s, stage="detections", **kw)[0] for s in batches]
    ml = get("ml")
    refine = lambda i: ml(batches[i], init=dets[i], iterations=LEARNED_REFINE_STEPS, init_prune=0, batch=args.batch)
    idx = list(range(len(batches)))
    refine(0)
    _sync(device)
    t = time.perf_counter()
    for i in idx:
        refine(i)
    _sync(device)
    rates["refinement"] = len(scenes) / (time.perf_counter() - t)
    grow = lambda i: ml(batches[i], init=dets[i], iterations=LEARNED_REFINE_STEPS, init_prune=0, init_grow=LEARNED_GROW, batch=args.batch)
    grow(0)
    _sync(device)
    t = time.perf_counter()
    for i in idx:
        grow(i)
    _sync(device)
    rates["refinement_and_growth"] = len(scenes) / (time.perf_counter() - t)
    for name in ("learned", "learned+ml"):
        est = get(name)
        est(batches[0], batch=args.batch)
        _sync(device)
        t = time.perf_counter()
        est(scenes, batch=args.batch)
        _sync(device)
        rates[f"{name}_end_to_end"] = len(scenes) / (time.perf_counter() - t)
    out["scenes_per_s"] = {k: round(v, 1) for k, v in rates.items()}

    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            refine(0)
            _sync(device)
        out["refinement_profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            with torch.no_grad():
                forward(model, inp(batches[0]), options, amp)
            _sync(device)
        out["forward_profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)

    if args.accuracy_scenes:
        acc = risloc.simulate(sc, args.accuracy_scenes, seed=args.seed, device=device)
        rows = {}
        for prec, a in (("float32", None), ("autocast", amp)):
            for stage in ("music", "detections"):
                ests = []
                for s0 in range(0, len(acc), args.batch):
                    s = acc[s0 : s0 + args.batch]
                    with torch.no_grad():
                        e, _ = run_model(model, s, options=options, calibration=cal, music_options=dict(cfg.music_options), autocast=a, stage=stage)
                    ests.append(ml(s, init=e, iterations=LEARNED_REFINE_STEPS, init_prune=0, batch=args.batch))
                est = type(ests[0]).cat(ests)
                rep = score(acc.truth, est, snr_db=acc.snr_db)
                hi = rep.subset(10, 20).overall
                rows[f"{prec}/{stage}"] = {"success": rep.overall.success, "K_acc": rep.overall.K_acc,
                                           "success_10_20": hi.success, "K_acc_10_20": hi.K_acc}
        out["accuracy"] = rows
    line = json.dumps(out)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
