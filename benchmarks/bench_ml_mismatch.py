"""``ml`` with and without its model-error option (``mismatch``) on impaired scenes.

    OMP_NUM_THREADS=1 python benchmarks/bench_ml_mismatch.py --scenes 150 --seed 1000 \\
        --json benchmarks/results/cpu/ml-mismatch/val_seed1000.json

For every impairment level (the ideal model; CSI NMSE -30, -20, -15, -10 dB; RIS phase noise
5, 10, 20 degrees) the same ``--scenes`` default scenes at 10-20 dB SNR (seed ``--seed``; the
impairments are scenario fields, so the ideal part of every scene is the same at every level)
are located by ``ml`` with each ``--modes`` value of its ``mismatch`` option ("none" = plain
``ml``, "auto", "scenario" = the level the scene was made with) and scored by
risloc.metrics.score: success, K_acc, K_over, K_under, and the seconds of each run.
``--methods learned,learned+ml`` runs those instead, each mode given to their likelihood stage
(``ml_options={"mismatch": mode}``).

    python benchmarks/bench_ml_mismatch.py --summarise val_seed1000.json val_seed2026.json

prints the Markdown table of several such files pooled (scene-weighted means per level and mode,
the ratio of each mode's success to plain ml's, "none").
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

LEVELS = [
    ("ideal", {}),
    ("csi -30 dB", {"csi_nmse_db": -30.0}),
    ("csi -20 dB", {"csi_nmse_db": -20.0}),
    ("csi -15 dB", {"csi_nmse_db": -15.0}),
    ("csi -10 dB", {"csi_nmse_db": -10.0}),
    ("phase noise 5 deg", {"ris_phase_noise_deg": 5.0}),
    ("phase noise 10 deg", {"ris_phase_noise_deg": 10.0}),
    ("phase noise 20 deg", {"ris_phase_noise_deg": 20.0}),
]


def _key(fields: dict) -> str:
    """Short name of a level for --levels: ideal, csi-15, pn10, ..."""
    if "csi_nmse_db" in fields:
        return f"csi{fields['csi_nmse_db']:g}"
    if "ris_phase_noise_deg" in fields:
        return f"pn{fields['ris_phase_noise_deg']:g}"
    return "ideal"


def summarise(paths: list[str]) -> str:
    """Markdown table of the rows of ``paths`` pooled per (level, mode), levels in file order."""
    pooled: dict[tuple[str, str], dict] = {}
    for path in paths:
        with open(path) as fh:
            for row in json.load(fh)["rows"]:
                label = row["mismatch"] if row.get("method", "ml") == "ml" else f"{row['method']} {row['mismatch']}"
                acc = pooled.setdefault((row["level"], label), {"scenes": 0, "seconds": 0.0})
                n = row["scenes"]
                acc["scenes"] += n
                acc["seconds"] += row["seconds"]
                for key in ("success", "K_acc", "K_over", "K_under"):
                    acc[key] = acc.get(key, 0.0) + row[key] * n
    modes = list(dict.fromkeys(m for _, m in pooled))
    lines = ["| level | n | " + " | ".join(f"{m}: success / K_acc / K_over / K_under" for m in modes)
             + " | " + " | ".join(f"{m} / {m.rsplit(' ', 1)[0] + ' none' if ' ' in m else 'none'}" for m in modes if not m.endswith("none")) + " |",
             "| --- | ---: | " + " | ".join("---" for _ in modes) + " | " + " | ".join("---:" for m in modes if not m.endswith("none")) + " |"]
    for level in dict.fromkeys(lv for lv, _ in pooled):
        cells, ratios, n = [], [], 0
        for m in modes:
            acc = pooled.get((level, m))
            if acc is None:
                cells.append("")
                continue
            n = acc["scenes"]
            mean = {k: acc[k] / n for k in ("success", "K_acc", "K_over", "K_under")}
            cells.append(f"{mean['success']:.3f} / {mean['K_acc']:.3f} / {mean['K_over']:.3f} / {mean['K_under']:.3f}")
            if not m.endswith("none"):
                base = pooled.get((level, m.rsplit(" ", 1)[0] + " none" if " " in m else "none"))
                ratios.append(f"{mean['success'] / (base['success'] / base['scenes']):.3f}" if base and base["success"] > 0 else "")
        lines.append(f"| {level} | {n} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=150)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--modes", default="none,auto", help="comma-separated values of ml's mismatch option")
    ap.add_argument("--methods", default="ml", help="comma-separated: ml, learned, learned+ml (these two get the mode "
                    "through ml_options, their likelihood stage)")
    ap.add_argument("--levels", default=None, help="comma-separated level keys to run, e.g. ideal,csi-15,pn10 (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--summarise", nargs="+", default=None, metavar="JSON", help="print the pooled table of these result files")
    args = ap.parse_args()
    if args.summarise:
        print(summarise(args.summarise))
        return
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    levels = LEVELS
    if args.levels is not None:  # in the order given
        by_key = {_key(f): (n, f) for n, f in LEVELS}
        unknown = [k for k in args.levels.split(",") if k not in by_key]
        if unknown:
            raise SystemExit(f"unknown level(s) {unknown}; known: {list(by_key)}")
        levels = [by_key[k] for k in args.levels.split(",")]
    methods = args.methods.split(",")
    rows = []
    for name, fields in levels:
        sc = risloc.Scenario(snr_db_min=10.0, snr_db_max=20.0, **fields)
        scenes = risloc.simulate(sc, args.scenes, seed=args.seed)
        for method, mode in ((me, mo) for me in methods for mo in modes):
            t0 = time.perf_counter()
            if method == "ml":
                est = get("ml")(scenes, batch=args.batch, mismatch=mode)
            else:
                est = get(method)(scenes, batch=args.batch, ml_options={"mismatch": mode})
            dt = time.perf_counter() - t0
            m = score(scenes, est).overall
            row = {"level": name, "fields": fields, "method": method, "mismatch": mode, "scenes": len(scenes),
                   "success": m.success, "K_acc": m.K_acc, "K_over": m.K_over, "K_under": m.K_under, "seconds": round(dt, 1)}
            rows.append(row)
            print(f"{name:20s} {method:10s} {mode:9s} success {m.success:.3f}  K_acc {m.K_acc:.3f}  over {m.K_over:.3f}  "
                  f"under {m.K_under:.3f}  {dt:.0f} s", flush=True)
        if args.json:  # rewritten after every level: an interrupted run keeps the levels it finished
            out = {"provenance": stamp(seed=args.seed, device="cpu", config=vars(args)), "rows": rows}
            atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
