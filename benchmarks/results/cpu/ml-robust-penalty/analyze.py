"""Offline evaluation of ml-robust's floor acceptance threshold from the study's records.

For a threshold P [nats], ml-robust(P) = ml-robust(penalty 0)'s answer where the best floor's NLL
gain over the plain fit exceeds P, else ml's answer (exact: all floor candidates carry the same
penalty, so the chosen candidate does not depend on P; _rescore keeps the plain path elsewhere).
"""
import glob, gzip, json, os, sys
import numpy as np

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
LEVELS = ["ideal", "csi-30", "csi-15", "pn10"]
SEEDS = [1000, 2026]


def load():
    D = {}
    for seed in SEEDS:
        for lev in LEVELS:
            recs = [json.loads(l) for l in gzip.open(os.path.join(DATA, f"{seed}_{lev}.jsonl.gz"), "rt")]
            recs.sort(key=lambda r: r["start"])
            cat = lambda k: np.concatenate([np.asarray(r[k]) for r in recs])
            d = {k: cat(k) for k in ("K", "snr_db", "ok_ml", "ok_r0", "khat_ml", "khat_r0", "plain", "white", "coloured", "logs", "khat_plain")}
            d["cands"] = np.concatenate([np.asarray(r["cands"]) for r in recs])
            d["gain"] = d["plain"] - d["cands"].min(1)
            d["ok_ml"] = d["ok_ml"].astype(bool); d["ok_r0"] = d["ok_r0"].astype(bool)
            ver = [r for r in recs if "ok_r2" in r]
            d["verify"] = ver
            d["starts"] = [r["start"] for r in recs]
            D[seed, lev] = d
    return D


def at(d, P):
    take = d["gain"] > P
    return np.where(take, d["ok_r0"], d["ok_ml"]), take


def verify(D):
    """The offline answer at the default penalty (2 nats) against the product's ml-robust run."""
    n = bad = 0
    for (seed, lev), d in D.items():
        for r in d["verify"]:
            g = np.asarray(r["plain"]) - np.asarray(r["cands"]).min(1)
            pred = np.where(g > 2.0, r["ok_r0"], r["ok_ml"]).astype(bool)
            act = np.asarray(r["ok_r2"]).astype(bool)
            n += len(act); bad += int((pred != act).sum())
    return n, bad


if __name__ == "__main__":
    D = load()
    n, bad = verify(D)
    print(f"verification at 2 nats: {bad} of {n} scenes differ between offline and product")
    Ps = [0, 0.5, 1, 1.5, 2, 2.5, 2.77, 3, 3.5, 4, 5, 6, 8, 10, 15, 1e9]
    for seed in SEEDS:
        print(f"\nseed {seed}: scenes per level " + ", ".join(f"{lev} {len(D[seed, lev]['ok_ml'])}" for lev in LEVELS))
        print("P     | " + " | ".join(f"{lev:>22}" for lev in LEVELS))
        for P in Ps:
            row = []
            for lev in LEVELS:
                d = D[seed, lev]
                ok, take = at(d, P)
                gained = int((ok & ~d["ok_ml"]).sum()); lost = int((~ok & d["ok_ml"]).sum())
                row.append(f"{ok.sum():4d}/{d['ok_ml'].sum():4d} +{gained:<2d}-{lost:<2d} f{take.sum():4d}")
            print(f"{P:5.4g} | " + " | ".join(row))


def markdown(D, Ps=(0, 1, 2, 2.77, 3, 4, 5, 6, 8, 10)):
    """REPORT.md tables: per seed, threshold -> success of ml-robust vs ml per level, scenes gained/lost, floors taken."""
    out = []
    for seed in SEEDS:
        ns = {lev: len(D[seed, lev]["ok_ml"]) for lev in LEVELS}
        out += [f"**seed {seed}** (scenes: " + ", ".join(f"{lev} {ns[lev]}" for lev in LEVELS) + ")", "",
                "| P [nats] | " + " | ".join(f"{lev}: ok robust / ml (+won −lost, floors)" for lev in LEVELS) + " |",
                "| ---: | " + " | ".join("---" for _ in LEVELS) + " |"]
        for P in Ps:
            row = []
            for lev in LEVELS:
                d = D[seed, lev]
                ok, take = at(d, P)
                won = int((ok & ~d["ok_ml"]).sum()); lost = int((~ok & d["ok_ml"]).sum())
                row.append(f"{ok.sum()} / {d['ok_ml'].sum()} (+{won} −{lost}, {take.sum()})")
            out.append(f"| {P:g} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)
