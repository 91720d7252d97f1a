"""Bad input at the command line: each refused input gives one line on stderr that names the
file (or the option) and what is wrong, exit status 2, no traceback, and leaves no output file
(not even a temporary one; an existing output keeps its content)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

import risloc
from risloc import io
from risloc.cli import main
from risloc.estimators import available
from risloc.nn.inference import DEFAULT_WEIGHTS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good scene file and bad inputs of every kind, in a folder of their own."""
    d = tmp_path_factory.mktemp("bad-input")
    good = d / "scenes.h5"
    io.save_scenes(risloc.simulate(risloc.Scenario(), 3, seed=1), good)
    data = good.read_bytes()
    (d / "text.h5").write_text("these are not scenes\n")
    (d / "truncated.h5").write_bytes(data[: len(data) // 2])
    missing = d / "no-codes.h5"
    missing.write_bytes(data)
    with h5py.File(missing, "a") as f:
        del f["codes"]
    with h5py.File(d / "crb-no-phi.h5", "w") as f:
        f.attrs["content"] = "crb"
        f.create_dataset("crb/theta", data=torch.ones(3, 5).numpy())
        f.create_dataset("crb/r", data=torch.ones(3, 5).numpy())
    (d / "crb-text.h5").write_text("not a CRB file\n")
    assert main(["locate", str(good), "--out", str(d / "est.h5"), "--method", "music", "--no-progress"]) == 0
    assert io.load_estimates(d / "est.h5").K.shape == (3,)  # a real estimates file, for the tests that read one
    weights = DEFAULT_WEIGHTS.read_bytes()
    (d / "truncated.pt").write_bytes(weights[: len(weights) // 3])
    torch.save({"epoch": 3, "weights": torch.ones(2)}, d / "foreign.pt")
    (d / "bad.toml").write_text("k_max = = 3\n")
    (d / "unknown-field.toml").write_text("no_such_field = 3\n")
    return d


def _refused(capsys, tmp_path, argv: list[str], names: str, out: Path | None = None) -> str:
    """Run ``risloc argv``; check exit status 2, one stderr line naming ``names`` and no
    file written into ``tmp_path`` (the output folder of the run). Returns the line."""
    before = sorted(os.listdir(tmp_path))
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"risloc {argv[0]}: error: ") and names in err, err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before, "an output or temporary file was left behind"
    if out is not None:
        assert not out.exists()
    return err


@pytest.mark.parametrize("bad, what", [
    ("text.h5", "not a readable scene file"),
    ("truncated.h5", "truncated"),
    ("no-codes.h5", "dataset 'codes' is missing"),
    ("no-such-file.h5", "does not exist"),
])
def test_locate_refuses_bad_scene_files(files, tmp_path, capsys, bad, what):
    out = tmp_path / "est.h5"
    err = _refused(capsys, tmp_path, ["locate", str(files / bad), "--out", str(out), "--no-progress"], str(files / bad), out)
    assert what in err


def test_refused_run_keeps_an_existing_output(files, tmp_path, capsys):
    out = tmp_path / "est.h5"
    out.write_bytes(b"previous result")
    _refused(capsys, tmp_path, ["locate", str(files / "truncated.h5"), "--out", str(out), "--no-progress"], "truncated.h5")
    assert out.read_bytes() == b"previous result"


@pytest.mark.parametrize("bad, what", [("crb-no-phi.h5", "missing dataset crb/phi"), ("crb-text.h5", "not a readable CRB file")])
def test_evaluate_refuses_a_malformed_crb_file(files, tmp_path, capsys, bad, what):
    out = tmp_path / "score.json"
    argv = ["evaluate", str(files / "scenes.h5"), str(files / "est.h5"), "--crb", str(files / bad), "--json", str(out)]
    assert what in _refused(capsys, tmp_path, argv, str(files / bad), out)


def test_evaluate_refuses_an_estimates_file_that_is_not_hdf5(files, tmp_path, capsys):
    argv = ["evaluate", str(files / "scenes.h5"), str(files / "text.h5")]
    assert "not a readable estimates file" in _refused(capsys, tmp_path, argv, str(files / "text.h5"))


@pytest.mark.parametrize("bad, what", [("truncated.pt", "not a torch checkpoint"),
                                       ("foreign.pt", "not a risloc learned-model checkpoint")])
def test_locate_refuses_a_bad_checkpoint(files, tmp_path, capsys, bad, what):
    out = tmp_path / "est.h5"
    argv = ["locate", str(files / "scenes.h5"), "--out", str(out), "--method", "learned", "--checkpoint", str(files / bad)]
    assert what in _refused(capsys, tmp_path, argv, str(files / bad), out)  # progress bar on: still one line


@pytest.mark.parametrize("command", ["locate", "crb"])
def test_batch_zero(files, tmp_path, capsys, command):
    out = tmp_path / "out.h5"
    argv = [command, str(files / "scenes.h5"), "--out", str(out), "--batch", "0", "--no-progress"]
    _refused(capsys, tmp_path, argv, "--batch", out)


@pytest.mark.parametrize("bad, what", [("bad.toml", "not valid TOML"), ("unknown-field.toml", "no_such_field")])
def test_simulate_refuses_a_malformed_scenario_toml(files, tmp_path, capsys, bad, what):
    out = tmp_path / "scenes.h5"
    argv = ["simulate", "--out", str(out), "--scenes", "2", "--config", str(files / bad), "--quiet"]
    assert what in _refused(capsys, tmp_path, argv, str(files / bad), out)


def test_train_refuses_a_malformed_config_toml(files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", str(files / "bad.toml"), "--out", str(out)]
    assert "not valid TOML" in _refused(capsys, tmp_path, argv, str(files / "bad.toml"), out)


def test_locate_list_names_every_estimator(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["locate", "--list"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.split() == available()


def test_the_installed_command_prints_one_line_and_exits_2(files, tmp_path):
    """The real entry point (a new process): exit status 2 and exactly one line, no traceback."""
    out = tmp_path / "est.h5"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(risloc.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "risloc", "locate", str(files / "text.h5"), "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "text.h5" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def test_locate_refuses_a_known_k_outside_the_scenario(tmp_path, capsys):
    """`risloc locate --k N` with N > k_max: one line naming --k and the scene, exit 2, no output file."""
    from risloc.cli import main as cli_main

    scenes = tmp_path / "s.h5"
    assert cli_main(["simulate", "--out", str(scenes), "--scenes", "2", "--seed", "0", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "e.h5"
    assert cli_main(["locate", str(scenes), "--out", str(out), "--method", "music", "--k", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--k 9" in err[0] and "scene 0" in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_a_packaged_model_name_is_a_checkpoint_and_an_unknown_name_is_refused(files, tmp_path, capsys):
    """`--checkpoint NAME` (locate, bench) and `--method-checkpoint METHOD=NAME` (bench): a bare
    name is the packaged model src/risloc/weights/NAME.pt; an unknown name is refused, one line
    naming the flag and listing the packaged models; a missing path keeps its own message."""
    from risloc.bench import BenchConfig
    from risloc.bench.run import checkpoint_files
    from risloc.nn.checkpoint import PACKAGED_MODELS, file_sha256, packaged_models

    mixed = PACKAGED_MODELS / "mixed.pt"
    assert "mixed" in packaged_models() and mixed.is_file()
    out = tmp_path / "est.h5"
    assert main(["locate", str(files / "scenes.h5"), "--out", str(out), "--method", "learned", "--checkpoint", "mixed",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert io.load_estimates(out).method == f"learned:{file_sha256(mixed)[:12]}"  # the packaged model's weights ran
    out.unlink()
    # bench's argument check: names become the packaged files, which the methods then read
    cfg = checkpoint_files(BenchConfig(checkpoint="mixed", method_checkpoints={"subspacenet": "subspacenet"}))
    assert Path(cfg.checkpoint) == mixed and cfg.method_checkpoints == {"subspacenet": str(PACKAGED_MODELS / "subspacenet.pt")}
    listed = str(packaged_models())
    report = tmp_path / "report"
    for argv, flag in ((["bench", "--checkpoint", "no_such_model"], "--checkpoint 'no_such_model'"),
                       (["bench", "--method-checkpoint", "subspacenet=no_such_model"], "--method-checkpoint subspacenet: 'no_such_model'"),
                       (["locate", str(files / "scenes.h5"), "--method", "learned", "--checkpoint", "no_such_model"],
                        "--checkpoint 'no_such_model'")):
        err = _refused(capsys, tmp_path, [*argv, "--out", str(report if argv[0] == "bench" else out), "--no-progress"], flag)
        assert f"neither a file nor a packaged model (packaged: {listed})" in err
    err = _refused(capsys, tmp_path, ["bench", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(report)], "missing.pt")
    assert err.endswith("no such file")


@pytest.mark.parametrize("device, names", [("gpu", "--device 'gpu' is not a device"),
                                           ("cuda", "--device cuda: no CUDA device is available")])
@pytest.mark.parametrize("command", ["simulate", "locate", "crb", "bench", "calibrate"])
def test_a_device_this_machine_lacks_is_refused_before_any_work(files, tmp_path, capsys, monkeypatch, command, device, names):
    """Every sub-command's --device is checked by risloc.cli.main (one line naming it, exit 2) before
    any work; torch had raised from deep inside ('Torch not compiled with CUDA enabled')."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = {"simulate": ["simulate", "--out", str(tmp_path / "s.h5"), "--scenes", "2"],
            "locate": ["locate", str(files / "scenes.h5"), "--out", str(tmp_path / "e.h5")],
            "crb": ["crb", str(files / "scenes.h5"), "--out", str(tmp_path / "c.h5")],
            "bench": ["bench", "--quick", "--out", str(tmp_path / "b")],
            "calibrate": ["calibrate", str(files / "truncated.pt")]}[command] + ["--device", device]
    _refused(capsys, tmp_path, argv, names)


def test_training_on_a_device_this_machine_lacks_is_refused(monkeypatch):
    from risloc.nn.distributed import Dist, device_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    single = Dist()
    with pytest.raises(ValueError, match="TrainConfig.device = cuda: no CUDA device"):
        device_for("cuda", single)
    with pytest.raises(ValueError, match="TrainConfig.device = 'gpu' is not a device"):
        device_for("gpu", single)
    assert device_for("auto", single) == torch.device("cpu")


def test_an_option_of_the_wrong_kind_is_refused_naming_it(files, tmp_path, capsys):
    good = str(files / "scenes.h5")
    out = tmp_path / "e.h5"
    for method, item, names in [("learned", "ml_options=notjson", "ml_options = 'notjson': expected an object"),
                                ("learned", "ml_options=[1,2]", "expected an object"),
                                ("music", "options=foo", "options = 'foo': expected an object of its fields"),
                                ("music", 'options={"bta": 0.5}', "no field(s) bta"),
                                ("sbl", "keep=foo", "keep = 'foo': expected an integer"),
                                ("ml", "penalty_stochastic=foo", "expected a number"),
                                ("ml", "grid_shape=[3,3]", "expected a list of 3 integers"),
                                ("learned", "beta=true", "beta = True: expected a number"),
                                ("ml", "iterations=-3", "ml: iterations = -3: must be >= 0")]:
        _refused(capsys, tmp_path, ["locate", good, "--out", str(out), "--method", method, "--option", item, "--no-progress"], names)


def test_options_of_the_right_kind_pass_and_an_object_builds_a_dataclass_option():
    from risloc import estimators
    from risloc.cli.locate import parse_options
    from risloc.covariance import CovarianceOptions

    opts = parse_options(estimators.get("music"), ['options={"beta": 0.5}', "refine=ml"])
    assert opts["options"] == CovarianceOptions(beta=0.5) and opts["refine"] == "ml"
    opts = parse_options(estimators.get("ml"), ["grid_shape=[9,5,6]", "penalty_stochastic=8", 'mismatch_kinds=["white"]',
                                                "iterations=4"])
    assert opts == {"grid_shape": (9, 5, 6), "penalty_stochastic": 8, "mismatch_kinds": ("white",), "iterations": 4}
    assert parse_options(estimators.get("learned"), ['ml_options={"relax_sources": 0}', "over=2"]) == {
        "ml_options": {"relax_sources": 0}, "over": 2}
    # what the options' own annotations admit (MLOptions and sbl's OPTION_TYPES for options taken through **options)
    for method, item, value in [("ml", "power_margin_db=null", None), ("ml", "relax_at=[2,3]", (2, 3)),
                                ("ml", "mismatch=0.01", 0.01), ("ml-robust", "mismatch=0.01", 0.01),
                                ("ml-joint", "mismatch=0.01", 0.01), ("sbl", "keep=null", None),
                                ("ramezani", "full_rank=null", None), ("ml-joint", "hardware_penalty=3", 3)]:
        key = item.split("=")[0]
        assert parse_options(estimators.get(method), [item]) == {key: value}, (method, item)
    for method, item, names in [("sbl", "iterations=null", "takes no null"), ("ml", 'options={"top": 3}', "Python object"),
                                ("music", 'options={"beta": "x"}', "option options")]:
        with pytest.raises(ValueError, match=names):
            parse_options(estimators.get(method), [item])


def test_evaluate_json_that_is_an_input_is_refused(files, tmp_path, capsys):
    est = tmp_path / "est.h5"
    est.write_bytes((files / "est.h5").read_bytes())
    before = est.read_bytes()
    assert main(["evaluate", str(files / "scenes.h5"), str(est), "--json", str(est)]) == 2
    assert "is the estimates file itself" in capsys.readouterr().err and est.read_bytes() == before


@pytest.mark.parametrize("command", ["locate", "crb"])
def test_an_output_that_is_the_input_is_refused(files, tmp_path, capsys, command):
    scenes = tmp_path / "scenes.h5"
    scenes.write_bytes((files / "scenes.h5").read_bytes())
    before = scenes.read_bytes()
    rc = main([command, str(scenes), "--out", str(tmp_path / "." / "scenes.h5"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "is the scene file itself" in err, err
    assert scenes.read_bytes() == before


def test_an_impossible_separation_is_refused_naming_the_field(tmp_path, capsys):
    _refused(capsys, tmp_path, ["simulate", "--out", str(tmp_path / "s.h5"), "--scenes", "3", "--set", "min_separation=3",
                                "--quiet"], "Scenario.min_separation = 3 rad")


def test_learned_refuses_scenes_that_allow_more_sources_than_its_k_head_counts(tmp_path):
    scenes = risloc.simulate(risloc.Scenario(k_max=6), 2, seed=1)
    with pytest.raises(ValueError, match="counts at most k_max = 5 sources .* the scenes allow k_max = 6"):
        risloc.locate(scenes, "learned")
    est = risloc.locate(risloc.simulate(risloc.Scenario(k_max=3), 2, seed=1), "learned")  # fewer: answered within 0..3
    assert ((est.K >= 0) & (est.K <= 3)).all()


def test_crb_of_an_empty_scene_file_is_an_empty_crb_file(files, tmp_path):
    empty = tmp_path / "empty.h5"
    empty.write_bytes((files / "scenes.h5").read_bytes())
    with h5py.File(empty, "a") as f:
        f.visititems(lambda name, d: d.resize(0, axis=0) if isinstance(d, h5py.Dataset) and d.maxshape[:1] == (None,) else None)
    assert main(["crb", str(empty), "--out", str(tmp_path / "c.h5"), "--no-progress"]) == 0
    assert io.load_crb(tmp_path / "c.h5").phi.shape == (0, 5)
