"""Speed of the shipped learned pipeline, stage by stage, and what each speed choice costs in accuracy.

    PYTHONPATH=src python3 benchmarks/bench_learned_speed.py --device cuda --batch 1024
    PYTHONPATH=src python3 benchmarks/bench_learned_speed.py --device cpu --batch 64 --scenes 128 --accuracy-scenes 0

On simulated default-scenario scenes of ``--seed`` (default: the validation seed 1000) on
``--device``, with the packaged model (or ``--checkpoint``), it times in scenes/s at ``--batch``:
the inputs, the matched-filter front end, the network's forward in float32 and under the
checkpoint's autocast (bf16 on CUDA), the network with the K decision and detections (and with
the MUSIC step on the detections' effective covariance) in the precision of inference
(``INFERENCE_AUTOCAST``), the likelihood refinement (``ml`` from the detections,
``LEARNED_DEFAULTS["iterations"]`` steps), ``learned``'s whole likelihood stage (from its start,
the K-hat + ``LEARNED_OVER`` strongest detections: refinement, growth, RELAX, pruning, with the
options of ``risloc.nn.inference.stage_options`` for the scenes' signal model), and ``learned`` / ``learned+ml`` end to end through the registry
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
from risloc._files import atomic_write_text
from risloc._provenance import stamp
from risloc.estimators import get
from risloc.metrics import score
from risloc.nn.inference import (DEFAULT_WEIGHTS, INFERENCE_AUTOCAST, LEARNED_DEFAULTS, LEARNED_OVER, _start, load_model, run_model,
                                 stage_options)
from risloc.nn.inputs import forward, prepare_inputs
from risloc.nn.networks.spectrum import matched_filter_spectra


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(fn, items, device, n_scenes, warm=None):
    """Scenes/s of ``fn`` called on every item (``n_scenes`` scenes in all), after one warm-up
    call on ``warm`` (default: the first item)."""
    fn(items[0] if warm is None else warm)
    _sync(device)
    t = time.perf_counter()
    for item in items:
        fn(item)
    _sync(device)
    return n_scenes / (time.perf_counter() - t)


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
           "batch": args.batch, "scenes": len(scenes), "autocast": str(amp), "inference_autocast": str(INFERENCE_AUTOCAST),
           "provenance": stamp(seed=args.seed, device=device, config=vars(args))}
    inp = lambda s: prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=options.regularisation)
    grid = model.grid(device)
    rate = lambda fn, items: _rate(fn, items, device, len(scenes))
    rates = {}
    with torch.no_grad():
        rates["inputs"] = rate(inp, batches)
        rates["front_end"] = rate(lambda s: matched_filter_spectra(s.y, s.H, s.codes, grid, picks=cfg.model.pursuit), batches)
        rates["forward_float32"] = rate(lambda s: forward(model, inp(s), options, None), batches)
        rates["forward_autocast"] = rate(lambda s: forward(model, inp(s), options, amp), batches)
        kw = dict(options=options, calibration=cal, music_options=dict(cfg.music_options), autocast=INFERENCE_AUTOCAST)
        rates["network_and_detections"] = rate(lambda s: run_model(model, s, stage="detections", **kw), batches)
        rates["network_and_music"] = rate(lambda s: run_model(model, s, stage="music", **kw), batches)
        firsts = [_start(s, args.checkpoint, None, True, None, None, LEARNED_OVER) for s in batches]
        dets = [first for first, _, _ in firsts]  # the K-hat strongest detections
        starts = [start for _, start, _ in firsts]  # learned's start: K-hat + LEARNED_OVER detections
    ml = get("ml")
    pairs = list(zip(batches, dets))
    steps = LEARNED_DEFAULTS["iterations"]
    refine = lambda p: ml(p[0], init=p[1], iterations=steps, init_prune=0, batch=args.batch)
    rates["refinement"] = rate(refine, pairs)
    stage = stage_options(batches[0].scenario.signal)
    rates["likelihood_stage"] = rate(lambda p: ml(p[0], init=p[1], batch=args.batch, **stage), list(zip(batches, starts)))
    for name in ("learned", "learned+ml"):
        est = get(name)
        rates[f"{name}_end_to_end"] = _rate(lambda x: est(x, batch=args.batch), [scenes], device, len(scenes), warm=batches[0])
    out["scenes_per_s"] = {k: round(v, 1) for k, v in rates.items()}

    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            refine(pairs[0])
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
                    ests.append(ml(s, init=e, iterations=steps, init_prune=0, batch=args.batch))
                est = type(ests[0]).cat(ests)
                rep = score(acc.truth, est, snr_db=acc.snr_db)
                hi = rep.subset(10, 20).overall
                rows[f"{prec}/{stage}"] = {"success": rep.overall.success, "K_acc": rep.overall.K_acc,
                                           "success_10_20": hi.success, "K_acc_10_20": hi.K_acc}
        out["accuracy"] = rows
    line = json.dumps(out)
    print(line)
    if args.json:
        atomic_write_text(args.json, line + "\n")


if __name__ == "__main__":
    main()
