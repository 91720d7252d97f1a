"""Train the learned estimator (`learned`) for your own geometry, then locate with it.

(No training is needed to run ``learned`` on another geometry: the packaged ``family`` network
reads scenes of any RIS size, antenna count and snapshot count, ``risloc.locate(scenes,
"learned", checkpoint="family")``; docs/learned.md. A network trained for your geometry alone
may do a little better.)

By default a tiny run on the CPU (the default network made small, 3 epochs of 60 steps of 64
scenes: a smoke test of your set-up, not a useful model):

    python examples/train_learned.py --set n_h=8 --set n_v=8 --set m_bs=8 --out runs/my-ris

A real run: the shipped model's configuration (``--preset full``: 9 epochs of 1 000 steps of 256
scenes, the full-size network, bf16, calibration at the end; the shipped model's 7 epochs took 499 s on one H100,
benchmarks/results/h100/default-model), on a GPU:

    python examples/train_learned.py --preset full --device cuda --set n_h=8 --set n_v=8 --out runs/my-ris

or the same from the command line, with every option of the trainer (``risloc train --help``):

    risloc train --config configs/default.toml --scenario.n_h 8 --scenario.n_v 8 --out runs/my-ris

``--set FIELD=VALUE`` changes any field of the scenario (docs/model.md; radians and metres),
``--scenario FILE.toml`` reads one (``risloc.Scenario.save`` writes it). The run folder gets
``best.pt``, ``last.pt`` (``--resume`` continues it), ``metrics.jsonl`` and ``weights.pt``, the
calibrated inference-only model that ``risloc.locate(..., method="learned",
checkpoint=".../weights.pt")`` and ``risloc locate --checkpoint`` take. The script then scores
it on ``--test-scenes`` fresh scenes of your scenario (seed ``--test-seed``, not the training or
validation stream).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import risloc
from risloc.nn.config import TrainConfig, apply_overrides
from risloc.nn.train import train

# The default network made small enough for a CPU (configs/spectrum-cpu-quick.toml).
TINY = {
    "epochs": 3, "steps_per_epoch": 60, "batch": 64, "val_scenes": 256, "val_batch": 128, "warmup_steps": 20,
    "log_every": 20, "model.width": 16, "model.depth": 1, "model.grid_phi": 24, "model.grid_theta": 12,
    "model.grid_rho": 12, "model.pursuit": 5, "model.channels_last": False,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/my-ris"), help="run folder (default runs/my-ris)")
    ap.add_argument("--preset", choices=("tiny", "full"), default="tiny", help="tiny CPU run (default) or the shipped model's run")
    ap.add_argument("--scenario", type=Path, help="scenario TOML (default: the default scenario)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="change a scenario field (repeatable)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--epochs", type=int, help="override the preset's epochs")
    ap.add_argument("--steps", type=int, help="override the preset's steps per epoch")
    ap.add_argument("--batch", type=int, help="override the preset's batch (scenes per step)")
    ap.add_argument("--val-scenes", type=int, help="override the preset's validation scenes")
    ap.add_argument("--test-scenes", type=int, default=200, help="fresh scenes to score the trained model on (default 200; 0: skip)")
    ap.add_argument("--test-seed", type=int, default=123_457, help="seed of those scenes (default 123457)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = ap.parse_args(argv)

    scenario = risloc.Scenario.load(args.scenario) if args.scenario else risloc.Scenario()
    scenario = scenario.with_overrides(args.set)
    cfg = TrainConfig(scenario=scenario, device=args.device)
    changes = dict(TINY) if args.preset == "tiny" else {}
    for key, value in (("epochs", args.epochs), ("steps_per_epoch", args.steps), ("batch", args.batch), ("val_scenes", args.val_scenes)):
        if value is not None:
            changes[key] = value
    if changes.get("val_scenes", cfg.val_scenes) < changes.get("val_batch", cfg.val_batch):
        changes["val_batch"] = changes.get("val_scenes", cfg.val_scenes)
    cfg = apply_overrides(cfg, changes)

    summary = train(cfg, args.out, resume=args.resume)
    print({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    weights = args.out / "weights.pt"
    print(f"model: {weights}")

    if args.test_scenes > 0:
        device = "cuda" if args.device == "auto" and __import__("torch").cuda.is_available() else args.device
        device = "cpu" if device == "auto" else device
        scenes = risloc.simulate(scenario, args.test_scenes, seed=args.test_seed, device=device)
        est = risloc.locate(scenes, method="learned", checkpoint=str(weights))
        print(risloc.evaluate(scenes, est))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
