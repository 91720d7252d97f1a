"""Compare every method on your own scene file.

    risloc simulate --out scenes.h5 --scenes 500 --seed 1            # or your own file (docs/scene-files.md)
    python examples/compare_methods.py scenes.h5                       # every method, CPU
    python examples/compare_methods.py scenes.h5 --methods ml,learned --device cuda --out compare.md

Runs each method on the same scenes (``--scenes N``: the first N of the file), keeps its estimates
in ``--estimates DIR`` (one ``METHOD.h5`` each, the file ``risloc evaluate`` reads), and prints
one row per method: success over all scenes and at 10…20 dB, K accuracy, RMSEs and scenes/s
(the wall time of one call, start-up included: a rough figure on a few scenes);
with the file's truth also the CRB-efficient success (an unbiased estimator at the Cramér–Rao
bound with the right K). ``--k-known`` gives every method that accepts it the true K (the
others count the sources themselves). A file
without truth (measurements only) gets estimates and speeds, no scores.

For a timed, reproducible comparison on simulated held-out scenes use ``risloc bench``
(docs/bench.md): it times warm batches and writes a full report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import risloc
from risloc.crb import crb_for_scenes
from risloc.estimators import available, info
from risloc.io import save_estimates


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scene_file", type=Path, help="HDF5 scene file (docs/scene-files.md)")
    ap.add_argument("--methods", default=",".join(available()), help="comma-separated (default: every method)")
    ap.add_argument("--scenes", type=int, help="use the first N scenes of the file (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--k-known", action="store_true", help="give methods that accept it the true K")
    ap.add_argument("--estimates", type=Path, default=Path("estimates"), help="folder for METHOD.h5 (default estimates/)")
    ap.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)

    if args.scenes is not None and args.scenes < 1:
        raise SystemExit(f"--scenes {args.scenes}: must be >= 1")
    scenes = risloc.load(args.scene_file, 0, args.scenes, device=args.device)
    if len(scenes) == 0:
        raise SystemExit(f"{args.scene_file}: the file holds no scenes")
    truth = scenes.truth is not None
    crb = crb_for_scenes(scenes) if truth else None
    K = scenes.truth.K if (truth and args.k_known) else None
    args.estimates.mkdir(parents=True, exist_ok=True)
    n = int(scenes.y.shape[0])

    head = "| method | success | success 10…20 dB | K accuracy | RMSE φ (°) | RMSE θ (°) | RMSE Δr/r | scenes/s |"
    lines = [f"{n} scenes of {args.scene_file}" + (", true K given" if K is not None else ""), "", head,
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ref = None
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        _sync(args.device)
        t0 = time.perf_counter()
        est = risloc.locate(scenes, method=method, K=K if info(method).accepts_k else None)
        _sync(args.device)
        speed = n / (time.perf_counter() - t0)
        save_estimates(est, args.estimates / f"{method.replace('+', '_')}.h5", scenes.scenario)
        if not truth:
            lines.append(f"| `{method}` | – | – | – | – | – | – | {speed:.3g} |")
            continue
        score = risloc.evaluate(scenes, est, crb=crb)
        high = score.subset(10, 20) if scenes.snr_db is not None else None
        o = score.overall
        lines.append(f"| `{method}` | {_fmt(o.success)} | {_fmt(high.overall.success) if high else '–'} | {_fmt(o.K_acc)} | "
                     f"{_fmt(o.rmse_phi_deg, 2)} | {_fmt(o.rmse_theta_deg, 2)} | {_fmt(o.rmse_rel_r)} | {speed:.3g} |")
        if ref is None:
            ref = f"| CRB-efficient | {_fmt(o.success_crb)} | {_fmt(high.overall.success_crb) if high else '–'} | – | – | – | – | – |"
    if ref:
        lines.insert(4, ref)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(f"estimates in {args.estimates}/ (risloc evaluate {args.scene_file} {args.estimates}/METHOD.h5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
