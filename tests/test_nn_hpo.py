"""risloc hpo: search space parsing, the missing-extra message, two tiny trials on a journal file."""

from __future__ import annotations

import json
import os
import sys

import optuna
import pytest

from risloc.cli import main
from risloc.nn.config import TrainConfig
from risloc.nn.hpo import space_from_dict

sys.path.insert(0, os.path.dirname(__file__))
from test_nn_train import tiny_config  # noqa: E402

SPACE = """
[space.lr]
low = 1e-4
high = 3e-3
log = true
[space."loss.beta"]
low = 0.0
high = 0.9
[space."loss.k_weight"]
low = 0.05
high = 0.3
[space."model.width"]
choices = [8, 16]
[space."model.depth"]
low = 1
high = 2
[pruner]
kind = "median"
startup_trials = 1
warmup_epochs = 0
"""


def test_search_space_is_checked_against_the_configuration():
    space = space_from_dict({"space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model.depth": {"low": 1, "high": 3},
                                       "model.width": {"choices": [64, 128]}}})
    assert [k.kind for k in space.knobs] == ["float", "int", "categorical"]
    with pytest.raises(ValueError, match="model.nope"):
        space_from_dict({"space": {"model.nope": {"low": 1, "high": 2}}})
    with pytest.raises(ValueError, match="needs low > 0"):
        space_from_dict({"space": {"lr": {"low": 0.0, "high": 1.0, "log": True}}})
    with pytest.raises(ValueError, match="needs low and high"):
        space_from_dict({"space": {"lr": {"low": 0.1}}})


def test_without_optuna_hpo_exits_with_the_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # "import optuna" raises ImportError
    rc = main(["hpo", "--study", "s", "--storage", str(tmp_path / "j.log"), "--space", str(tmp_path / "none.toml"),
               "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "pip install 'risloc[hpo]'" in capsys.readouterr().err


def test_two_trials_on_a_journal_file_and_best_config_trains(tmp_path, capsys):
    base = tiny_config(epochs=2, steps_per_epoch=2)
    (tmp_path / "base.toml").write_text(base.to_toml())
    (tmp_path / "space.toml").write_text(SPACE)
    journal = tmp_path / "hpo" / "journal.log"
    args = ["hpo", "--study", "tiny", "--storage", str(journal), "--space", str(tmp_path / "space.toml"),
            "--config", str(tmp_path / "base.toml"), "--out", str(tmp_path / "hpo"), "--trials", "2", "--sampler-seed", "0"]
    assert main(args) == 0
    assert journal.is_file()
    out = capsys.readouterr().out
    assert out.count("[TRIAL ") >= 2 and "[HPO] study 'tiny': best trial" in out

    from risloc.nn.hpo import journal_storage

    study = optuna.load_study(study_name="tiny", storage=journal_storage(journal))
    assert len(study.trials) == 2
    for t in study.trials:  # every finished epoch was reported for pruning
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        assert sorted(t.intermediate_values) == list(range(len(t.intermediate_values))) and t.intermediate_values
    best = TrainConfig.load(tmp_path / "hpo" / "best.toml")  # the trainer's own loader
    info = json.loads((tmp_path / "hpo" / "best.json").read_text())
    assert best.model.width == info["params"]["model.width"] in (8, 16)
    assert best.lr == pytest.approx(info["params"]["lr"]) and 1e-4 <= best.lr <= 3e-3
    assert best.epochs == 2 and best.val_scenes == base.val_scenes  # the base configuration underneath
    assert info["value"] == max(t.value for t in study.trials if t.value is not None)

    # a second worker on the same journal with the study's total already reached runs nothing
    assert main(args) == 0
    assert len(optuna.load_study(study_name="tiny", storage=journal_storage(journal)).trials) == 2
