"""Success against SNR for every method of a ``risloc bench`` run, with the CRB-efficient curve.

Reads the ``results.json`` that ``risloc bench`` wrote (no estimator is run again) and draws, per
5 dB SNR bin, the success rate of every method that estimated K itself (the "(K known)" rows of
``--oracle-k`` are left out unless ``--known-k``) and the success an unbiased estimator at the
Cramér–Rao bound with the right K would have on the same scenes (``crb.reference`` of the file).
The plot is drawn by :func:`risloc.bench.figures.success_vs_snr`, the function behind the
report's own ``success_vs_snr.png``.

    python benchmarks/plot_success_vs_snr.py benchmarks/results/h100/bench-heldout-15dfe39/results.json \
        docs/img/success_vs_snr.png

Success of a scene: K̂ = K and every source within 2° in φ and θ and 10 % of its range
(docs/metrics.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from risloc.bench.figures import success_vs_snr


def curves_from_results(res: dict, *, known_k: bool = False) -> tuple[dict, dict | None]:
    """The plot's data from a parsed ``results.json``: ``({method: {"snr": [...], "success": [...]}},
    {"snr": [...], "success_crb": [...]} or None)``; SNR at the bin centres (dB)."""
    curves = {}
    for name, m in res["methods"].items():
        if m.get("status") != "ok" or (m.get("known_k") and not known_k):
            continue
        rows = sorted(m["score"]["by_snr"], key=lambda b: b["snr_lo"])
        curves[name] = {"snr": [(b["snr_lo"] + b["snr_hi"]) / 2 for b in rows], "success": [b["success"] for b in rows]}
    crb = None
    ref = (res.get("crb") or {}).get("reference") or {}
    bins = sorted((k for k in ref if k.startswith("snr_bin_")), key=lambda k: float(k.split("_")[2]))
    if bins:
        crb = {"snr": [], "success_crb": []}
        for k in bins:
            lo, hi = float(k.split("_")[2]), float(k.split("_")[3])
            crb["snr"].append((lo + hi) / 2)
            crb["success_crb"].append(ref[k]["success_crb"])
    return curves, crb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="results.json of a risloc bench run")
    ap.add_argument("out", type=Path, help="PNG to write")
    ap.add_argument("--known-k", action="store_true", help="also draw the (K known) rows of an --oracle-k run")
    args = ap.parse_args(argv)
    res = json.loads(args.results.read_text())
    curves, crb = curves_from_results(res, known_k=args.known_k)
    if not curves:
        ap.error(f"{args.results}: no method with status 'ok'")
    if crb is None:
        print(f"{args.results}: no CRB reference (run without --no-crb); drawing the methods only")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    success_vs_snr(curves, crb, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
