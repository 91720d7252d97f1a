"""Data-parallel training (torchrun, gloo on CPU): scene split, 2 ranks == 1 process, rank agreement, resume.

The launches run ``python -m torch.distributed.run --nproc_per_node=2 -m risloc train`` in a
subprocess with one thread per rank. See docs/training-at-scale.md for what is (and is not)
bitwise: with the loss balancer off, 2 ranks x b scenes equal 1 process x 2b scenes up to float
rounding; with it on (the default) the ranks agree bitwise with each other but not with 1 process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from risloc.nn.checkpoint import load_checkpoint
from risloc.nn.config import apply_overrides
from risloc.nn.train import TrainData, train

sys.path.insert(0, os.path.dirname(__file__))
from test_nn_train import tiny_config  # noqa: E402

QUIET = lambda s: None  # noqa: E731


def ddp_config(**changes):
    """2 epochs x 3 steps of the simulated stream, global batch 8 (4 per rank), aux terms from epoch 1."""
    base = {"epochs": 2, "steps_per_epoch": 3, "train_scenes": 0, "loss.balance": False}
    base.update(changes)
    return tiny_config(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg, out, *extra, nproc=2) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.toml").write_text(cfg.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           "-m", "risloc", "train", "--config", str(out.parent / f"{out.name}.toml"), "--out", str(out), "--no-progress",
           "--dist-timeout", "60", *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _assert_close_states(a: dict, b: dict, what: str, atol: float = 2e-5) -> None:
    # Adam divides by sqrt(v): on (near-)zero gradients (the attention key bias has a mathematically
    # zero gradient) rounding noise becomes a step of ~lr, hence the absolute tolerance.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=lambda m: f"{what} {k}: {m}")


def _assert_progress(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k != "best"} == {k: v for k, v in b.items() if k != "best"}
    assert a["best"] == pytest.approx(b["best"], rel=1e-6)


def test_rank_shares_make_up_the_single_process_batch():
    for pool, family in ((0, ""), (64, ""), (0, "n_h=4,5;snapshots=4,6")):  # a family: every rank draws step g's geometry
        cfg = ddp_config(train_scenes=pool, geometries=family, **({"model.kind": "spectrum", "model.snapshot_quantiles": 4} if family else {}))
        one = TrainData(cfg, torch.device("cpu"), QUIET)
        ranks = [TrainData(cfg, torch.device("cpu"), QUIET, rank=r, world=2) for r in range(2)]
        for step in (0, 5, 9):  # 9: the pool wraps into its second pass
            full, parts = one.batch(step), [d.batch(step) for d in ranks]
            assert all(len(p.inputs) == 4 for p in parts)
            cat = lambda f: torch.cat([f(p) for p in parts])  # noqa: E731
            # the SNR of scenes whose label is withheld is estimated from the data (an eigen-decomposition
            # whose last float32 bits may depend on the batch size): 1e-4 dB is far below anything the
            # network resolves (its SNR labels are perturbed by snr_noise_db = 1.5 dB in training)
            torch.testing.assert_close(cat(lambda p: p.inputs.snr_db), full.inputs.snr_db, rtol=0, atol=1e-4)
            torch.testing.assert_close(cat(lambda p: p.inputs.snr_known), full.inputs.snr_known, rtol=0, atol=0)
            # the true factor is computed from the (exactly equal) draws; sin/cos of a 4- and an 8-scene batch may
            # take different vector paths (e.g. ATEN_CPU_CAPABILITY=avx2) and differ in the last float32 bit
            torch.testing.assert_close(cat(lambda p: p.true_factor), full.true_factor, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cat(lambda p: p.truth.phi), full.truth.phi, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(cat(lambda p: p.inputs.sample.factor), full.inputs.sample.factor, rtol=1e-5, atol=1e-6)
            assert all(p.inputs.scenario == full.inputs.scenario for p in parts)
    with pytest.raises(ValueError, match="not divisible"):
        TrainData(ddp_config(batch=9), torch.device("cpu"), QUIET, rank=0, world=2)


def test_two_ranks_equal_one_process_and_resume(tmp_path):
    cfg = ddp_config()
    train(cfg, tmp_path / "single", log=QUIET)  # 1 process, global batch 8
    train(cfg, tmp_path / "cut", log=QUIET, stop_after_epoch=0)  # 1 process, "killed" after epoch 0

    res = _torchrun(cfg, tmp_path / "ddp")  # 2 ranks x 4 scenes
    assert "world=2 backend=gloo batch=8 (4 per rank)" in res.stdout
    assert res.stdout.count("[VAL] epoch 1") == 1  # rank 0 alone logs
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert load_checkpoint(tmp_path / "ddp" / "best.pt")["distributed"]["world"] == 2
    d = ddp["distributed"]
    assert d["world"] == 2 and d["local_batch"] == 4
    assert len(d["param_digests"]) == 2 and len(set(d["param_digests"])) == 1  # both ranks ran, bitwise identical
    assert len(set(d["ema_digests"])) == 1
    single = load_checkpoint(tmp_path / "single" / "last.pt")
    assert ddp["scheduler"] == single["scheduler"]
    _assert_progress(ddp["progress"], single["progress"])
    for key in ("model", "ema", "objective"):
        _assert_close_states(single[key], ddp[key], key)
    la = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lb] == [0, 1] and all(x["world"] == 2 for x in lb)
    for x, y in zip(la, lb):
        assert y["val_nmse"] == pytest.approx(x["val_nmse"], rel=1e-5)
        assert y["train_cov"] == pytest.approx(x["train_cov"], rel=1e-5)  # epoch means over both ranks' scenes

    # --resume under DDP from a checkpoint written by one process (the stream is indexed by global step)
    res = _torchrun(cfg, tmp_path / "cut", "--resume")
    assert "[RESUME] from" in res.stdout
    cut = load_checkpoint(tmp_path / "cut" / "last.pt")
    _assert_progress(cut["progress"], single["progress"])
    assert len(set(cut["distributed"]["param_digests"])) == 1
    for key in ("model", "ema", "objective"):
        _assert_close_states(single[key], cut[key], key)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_balanced_loss_keeps_ranks_identical(tmp_path):
    cfg = apply_overrides(ddp_config(), {"loss.balance": True, "loss.uncertainty": True, "epochs": 2, "steps_per_epoch": 2})
    _torchrun(cfg, tmp_path / "ddp")
    d = load_checkpoint(tmp_path / "ddp" / "last.pt")["distributed"]
    assert len(d["param_digests"]) == 2 and len(set(d["param_digests"])) == 1 and len(set(d["ema_digests"])) == 1
    assert (tmp_path / "ddp" / "summary.json").exists()


def test_spectrum_two_ranks_time_budget_then_resume(tmp_path):
    """The default network (detection loss, K head from step 0, channels-last) on 2 gloo ranks with
    --time-budget: the ranks agree to stop (checked every 10 steps), last.pt at step 10 inside the
    epoch; --resume on 2 ranks finishes like one uninterrupted process (the same weights up to
    float rounding, bitwise the same on both ranks)."""
    from test_nn_spectrum import _tiny

    cfg = _tiny(epochs=1, steps_per_epoch=12, batch=8, train_scenes=0, val_scenes=8)
    assert cfg.model.channels_last
    train(cfg, tmp_path / "single", log=QUIET)
    res = _torchrun(cfg, tmp_path / "ddp", "--time-budget", "0.001")
    assert "world=2 backend=gloo batch=8 (4 per rank)" in res.stdout
    assert res.stdout.count("[BUDGET]") == 1
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["progress"]["step"] == 10
    assert not (tmp_path / "ddp" / "summary.json").exists()
    _torchrun(cfg, tmp_path / "ddp", "--resume")
    ddp, single = load_checkpoint(tmp_path / "ddp" / "last.pt"), load_checkpoint(tmp_path / "single" / "last.pt")
    assert ddp["progress"]["step"] == single["progress"]["step"] == 12
    assert len(set(ddp["distributed"]["param_digests"])) == 1
    # 12 steps: the convolution biases in front of a GroupNorm with one channel per group have a
    # mathematically zero gradient, so Adam turns rounding noise into steps (measured 2.8e-5)
    for key in ("model", "ema"):
        _assert_close_states(single[key], ddp[key], key, atol=1e-4)
    assert (tmp_path / "ddp" / "weights.pt").exists()
