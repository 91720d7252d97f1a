"""Speed of the spectrum network's pieces (no checkpoint needed): front end, forward, training step.

    PYTHONPATH=src python3 benchmarks/bench_spectrum.py --device cuda --batch 1024
    PYTHONPATH=src python3 benchmarks/bench_spectrum.py --device cpu --batch 32 --repeats 2

Times, in scenes/s on simulated default-scenario scenes: the matched-filter front end
(``risloc.nn.networks.spectrum.matched_filter_spectra``), the network's forward (bf16 autocast on CUDA)
and decoding, the inference path after the network (K-hat + local MUSIC), and one training step
(forward + detection loss + backward + AdamW) at ``--train-batch``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import risloc
from risloc._provenance import stamp
from risloc.nn.config import TrainConfig
from risloc.nn.inference import Calibration, locate_from_prediction
from risloc.nn.loss import Objective
from risloc.nn.inputs import prepare_inputs
from risloc.nn.networks import build_model, get_network
from risloc.nn.networks.spectrum import matched_filter_spectra
from risloc.simulate import source_factor


def _timed(fn, device, repeats):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--train-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--front-chunk", type=int, default=None, help="scenes per chunk of the front end (default: the module's)")
    ap.add_argument("--channels-last", action="store_true", help="channels-last-3d convolutions")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (e.g. model.width=48)")
    args = ap.parse_args(argv)
    from risloc.nn.config import apply_overrides

    if args.front_chunk:
        import risloc.nn.networks.spectrum as spectrum

        spectrum.FRONT_END_CHUNK = args.front_chunk
    cfg = TrainConfig.load(args.config)
    cfg = apply_overrides(cfg, dict(kv.split("=", 1) for kv in args.set))
    device = torch.device(args.device)
    sc = cfg.scenario
    model = build_model(sc, cfg.model).to(device)
    if args.channels_last:
        model.channels_last = True
    options = cfg.covariance_options(0.0)
    amp = torch.bfloat16 if device.type == "cuda" else None
    s = risloc.simulate(sc, args.batch, seed=5, device=device)
    inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=options.regularisation)
    grid = model.grid(device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "batch": args.batch, "params": sum(p.numel() for p in model.parameters()), "model": cfg.model.__dict__,
           "channels_last": args.channels_last, "front_chunk": args.front_chunk,
           "provenance": stamp(seed=5, device=device, config=vars(args))}

    t = _timed(lambda: prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=options.regularisation), device, args.repeats)
    out["inputs_scenes_per_s"] = args.batch / t
    t = _timed(lambda: matched_filter_spectra(s.y, s.H, s.codes, grid, picks=cfg.model.pursuit), device, args.repeats)
    out["front_end_scenes_per_s"] = args.batch / t
    model.eval()

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return model(inputs, options)

    out["forward_scenes_per_s"] = args.batch / _timed(forward, device, args.repeats)
    pred = forward()
    out["locate_after_network_scenes_per_s"] = args.batch / _timed(lambda: locate_from_prediction(pred, inputs, options, sc, Calibration()), device, args.repeats)

    def end_to_end():
        with torch.no_grad():
            inp = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=options.regularisation)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                p = model(inp, options)
            return locate_from_prediction(p, inp, options, sc, Calibration())

    out["end_to_end_scenes_per_s"] = args.batch / _timed(end_to_end, device, args.repeats)

    model.train()
    objective = Objective(cfg.loss, sc, get_network(cfg.model.kind)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = s[: args.train_batch]
    tin = prepare_inputs(b.y, b.H, b.codes, b.snr_db, regularisation=options.regularisation)
    F = source_factor(b.truth, sc)

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            p = model(tin, options)
        loss, _ = objective(p, tin, options, b.truth, F, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out["train_step_scenes_per_s"] = args.train_batch / _timed(step, device, args.repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
