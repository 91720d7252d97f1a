"""The scripts of examples/ run as a researcher would run them (a subprocess, in a temporary
folder), on a few scenes, and do what their docstrings say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import risloc
from risloc.io import load_estimates, validate_estimates_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_simulate_locate_evaluate(tmp_path):
    out = run("simulate_locate_evaluate.py", "--scenes", "4", "--method", "music", "--set", "k_fixed=1",
              "--plot", "fig.png", cwd=tmp_path)
    assert "| all | 4 |" in out  # the overall row of the scoring table, over the 4 scenes
    assert "success at CRB" in out  # scored against the Cramér–Rao reference
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_learned_for_own_geometry(tmp_path):
    out = run("train_learned.py", "--out", "run", "--set", "n_h=8", "--set", "n_v=6", "--epochs", "1", "--steps", "2",
              "--batch", "4", "--val-scenes", "8", "--test-scenes", "3", "--device", "cpu", cwd=tmp_path)
    weights = tmp_path / "run" / "weights.pt"
    ck = torch.load(weights, map_location="cpu", weights_only=True)
    sc = risloc.Scenario.from_dict(__import__("tomllib").loads(ck["scenario"]))
    assert (sc.n_h, sc.n_v) == (8, 6)  # the model was trained for the geometry asked for
    assert ck["calibration"] is not None
    assert "| all | 3 |" in out  # then scored on 3 fresh scenes of that geometry


def test_compare_methods_on_a_scene_file(tmp_path):
    scenes = risloc.simulate(risloc.Scenario(k_fixed=2), 3, seed=5)
    risloc.save(scenes, tmp_path / "mine.h5")
    out = run("compare_methods.py", "mine.h5", "--methods", "music,mvdr", "--k-known", "--estimates", "est",
              "--out", "table.md", cwd=tmp_path)
    table = (tmp_path / "table.md").read_text(encoding="utf-8")
    assert table in out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| method", "| ---"))]
    assert [r.split("|")[1].strip() for r in rows] == ["CRB-efficient", "`music`", "`mvdr`"]
    for name in ("music", "mvdr"):
        path = tmp_path / "est" / f"{name}.h5"
        validate_estimates_file(path)
        est = load_estimates(path)
        assert torch.equal(est.K.cpu(), scenes.truth.K.cpu())  # --k-known: the true K was given
