"""`risloc locate`: file in, estimates file out, option routing, refusals."""

import h5py
import numpy as np
import pytest
import torch

import risloc
from risloc import io
from risloc.cli import main
from risloc.cli.locate import estimator_options
from risloc.estimators import get


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("locate") / "scenes.h5"
    io.save_scenes(risloc.simulate(risloc.Scenario(), 5, seed=9), path)
    return path


def test_locate_writes_estimates(scene_file, tmp_path):
    out = tmp_path / "est.h5"
    rc = main(["locate", str(scene_file), "--out", str(out), "--method", "mvdr", "--batch", "2", "--no-progress", "--no-snr"])
    assert rc == 0
    est = io.load_estimates(out)
    assert len(est) == 5 and est.method == "mvdr"
    K = est.K.numpy()
    phi = est.phi.numpy()
    assert ((K >= 1) & (K <= 5)).all()
    for k, row in zip(K, phi):
        assert np.isfinite(row[:k]).all() and np.isnan(row[k:]).all()
    with h5py.File(out) as f:
        assert f.attrs["format"] == "risloc-estimates"
    assert not [p for p in tmp_path.iterdir() if p.name != "est.h5"]  # no temporary left behind


def test_the_default_method_is_learned(scene_file, tmp_path):
    """Without --method (and in Python without ``method``) the recommended estimator runs: ``learned``."""
    out = tmp_path / "est.h5"
    assert main(["locate", str(scene_file), "--out", str(out), "--no-progress"]) == 0
    est = io.load_estimates(out)
    assert est.method.startswith("learned:")
    again = risloc.locate(io.load_scenes(scene_file))
    assert again.method == est.method and torch.equal(again.K, est.K)


def test_option_routing():
    music, mvdr = get("music"), get("mvdr")
    assert estimator_options(music, order_rule="aic", no_snr=True) == {"order_rule": "aic", "use_snr": False}
    with pytest.raises(ValueError, match="checkpoint"):
        estimator_options(music, checkpoint="x.pt")
    with pytest.raises(ValueError, match="order"):
        estimator_options(mvdr, order_rule="mdl")


def test_estimator_options_from_the_command_line(scene_file, tmp_path, capsys):
    learned, ml = get("learned"), get("ml")
    got = estimator_options(learned, options=["grow=0", 'ml_options={"iterations": 2}', "refine=music"])
    assert got == {"grow": 0, "ml_options": {"iterations": 2}, "refine": "music"}
    assert estimator_options(ml, options=["top=16", "penalty_stochastic=7.5"]) == {"top": 16, "penalty_stochastic": 7.5}
    for item, message in (("grow", "expected KEY=VALUE"), ("nope=1", "has no option 'nope'"), ("checkpoint=x.pt", "use --checkpoint"),
                          ("K=2", "use --k")):
        with pytest.raises(ValueError, match=message):
            estimator_options(learned, options=[item])
    with pytest.raises(ValueError, match="one value per scene"):
        estimator_options(ml, options=["init=1"])
    # the option reaches the estimator: ml with one refinement step answers otherwise than with 25
    outs = []
    for steps in ("1", "25"):
        out = tmp_path / f"ml{steps}.h5"
        assert main(["locate", str(scene_file), "--out", str(out), "--method", "ml", "--option", f"final_iterations={steps}",
                     "--no-progress"]) == 0
        outs.append(io.load_estimates(out))
    assert not torch.allclose(outs[0].phi, outs[1].phi, equal_nan=True)
    assert main(["locate", str(scene_file), "--out", str(tmp_path / "x.h5"), "--method", "mvdr", "--option", "grow=0",
                 "--no-progress"]) == 2
    assert "mvdr has no option 'grow'" in capsys.readouterr().err


def test_refusals(scene_file, tmp_path, capsys):
    out = tmp_path / "est.h5"
    assert main(["locate", str(scene_file), "--out", str(out), "--method", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["locate", str(scene_file), "--out", str(out), "--method", "music", "--checkpoint", "c.pt", "--no-progress"]) == 2
    assert "checkpoint" in capsys.readouterr().err  # music reads no network
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["format"] = "something-else"
    assert main(["locate", str(bad), "--out", str(out), "--no-progress"]) == 2
    assert not out.exists()


def test_known_k(scene_file, tmp_path):
    out = tmp_path / "est.h5"
    assert main(["locate", str(scene_file), "--out", str(out), "--method", "music", "--k", "2", "--batch", "3", "--no-progress"]) == 0
    est = io.load_estimates(out)
    assert len(est) == 5 and (est.K.numpy() == 2).all()
    assert np.isfinite(est.phi.numpy()[:, :2]).all() and np.isnan(est.phi.numpy()[:, 2:]).all()
    assert main(["locate", str(scene_file), "--out", str(tmp_path / "e2.h5"), "--method", "music", "--k", "9", "--no-progress"]) == 2
    assert not (tmp_path / "e2.h5").exists()
