"""Hyper-parameter search of the trainer with Optuna (optional extra: ``pip install 'risloc[hpo]'``).

    risloc hpo --study s1 --storage runs/hpo/journal.log --config configs/cpu-quick.toml \\
               --space configs/hpo.toml --out runs/hpo --trials 40 --timeout 36000

A trial = one :func:`risloc.nn.train.train` run of the base configuration with the knobs of the
search space replaced by the sampler's suggestions (TPE by default). After every epoch the
trainer's ``on_epoch`` callback reports the validation ``primary`` metric (higher is better:
``k_loc`` = (2 success + K_acc)/3, or -NMSE with ``val_primary = "loss"``) with
``trial.report(value, epoch)`` and raises ``optuna.TrialPruned`` when the pruner (median rule by
default) says so. A trial's value is its best ``primary``; the study maximises it.

Several workers share one study through a journal file (``JournalStorage`` over a
``JournalFileBackend``; the older ``JournalFileStorage`` name on Optuna < 4): start the same
command N times (one per GPU / machine with the same file system). Every worker writes the best
trial so far as ``OUT/best.toml`` (a complete configuration for ``risloc train --config``) and
``OUT/best.json``.

The search space is TOML (``configs/hpo.toml``), one table per configuration key
(``lr``, ``loss.beta``, ``model.width``, ... — the keys of ``--set``)::

    [space.lr]
    low = 1e-4
    high = 3e-3
    log = true            # log-uniform
    [space."model.depth"]
    low = 1               # integers: suggest_int
    high = 4
    [space."model.width"]
    choices = [64, 128, 192]
    [pruner]              # optional: MedianPruner settings ("none" switches pruning off)
    kind = "median"
    startup_trials = 3
    warmup_epochs = 1

Nothing here imports Optuna at import time; the rest of risloc never does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .._files import atomic_write_text, read_toml
from .config import TrainConfig, apply_overrides

INSTALL_HINT = "risloc hpo needs Optuna, an optional extra: pip install 'risloc[hpo]'  (or: pip install 'optuna>=3.5')"


class OptunaMissing(ImportError):
    """Optuna is not installed."""


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise OptunaMissing(INSTALL_HINT) from None
    return optuna


# ----------------------------------------------------------------------------------------------
# the search space
# ----------------------------------------------------------------------------------------------
@dataclass
class Knob:
    """One searched configuration key: a float/int range (optionally log-scaled / stepped) or a set of choices."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] | None = None

    @property
    def kind(self) -> str:
        if self.choices is not None:
            return "categorical"
        return "int" if isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float) else "float"

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass
class SearchSpace:
    knobs: list[Knob]
    pruner: dict[str, Any] = field(default_factory=lambda: {"kind": "median", "startup_trials": 3, "warmup_epochs": 1})

    def suggest(self, trial) -> dict[str, Any]:
        return {k.key: k.suggest(trial) for k in self.knobs}

    def make_pruner(self):
        optuna = import_optuna()
        kind = str(self.pruner.get("kind", "median"))
        if kind == "none":
            return optuna.pruners.NopPruner()
        if kind != "median":
            raise ValueError(f"search space [pruner] kind = {kind!r}: must be 'median' or 'none'")
        return optuna.pruners.MedianPruner(n_startup_trials=int(self.pruner.get("startup_trials", 3)),
                                           n_warmup_steps=int(self.pruner.get("warmup_epochs", 1)))


def load_space(path: str | Path, base: TrainConfig | None = None) -> SearchSpace:
    """Read a search-space TOML file; every key is checked against the trainer's configuration."""
    path = Path(path)
    return space_from_dict(read_toml(path), base, where=str(path))


def space_from_dict(data: dict, base: TrainConfig | None = None, *, where: str = "search space") -> SearchSpace:
    unknown = set(data) - {"space", "pruner"}
    if unknown:
        raise ValueError(f"{where}: unknown table(s) {sorted(unknown)}; known: space, pruner")
    base = base or TrainConfig()
    knobs = []
    for key, spec in data.get("space", {}).items():
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: [space.{key}] must be a table with low/high[/log/step] or choices")
        extra = set(spec) - {"low", "high", "log", "step", "choices"}
        if extra:
            raise ValueError(f"{where}: [space.{key}] unknown field(s) {sorted(extra)}; known: low, high, log, step, choices")
        if "choices" in spec:
            if not spec["choices"] or set(spec) - {"choices"}:
                raise ValueError(f"{where}: [space.{key}] choices must be a non-empty list and come alone")
            knob = Knob(key, choices=list(spec["choices"]))
            probes = knob.choices
        else:
            if "low" not in spec or "high" not in spec:
                raise ValueError(f"{where}: [space.{key}] needs low and high (or choices)")
            knob = Knob(key, spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step"))
            if not knob.low < knob.high:
                raise ValueError(f"{where}: [space.{key}] low = {knob.low} must be < high = {knob.high}")
            if knob.log and knob.low <= 0:
                raise ValueError(f"{where}: [space.{key}] log = true needs low > 0")
            probes = [knob.low, knob.high]
        for v in probes:  # unknown keys and unreadable values fail here, naming the key
            apply_overrides(base, {key: v})
        knobs.append(knob)
    if not knobs:
        raise ValueError(f"{where}: no [space.<key>] tables")
    pruner = {"kind": "median", "startup_trials": 3, "warmup_epochs": 1, **data.get("pruner", {})}
    return SearchSpace(knobs, pruner)


# ----------------------------------------------------------------------------------------------
# storage, study, the objective
# ----------------------------------------------------------------------------------------------
def journal_storage(path: str | Path):
    """A study storage several processes can share: ``JournalStorage(JournalFileBackend(path))``
    (Optuna >= 4; ``JournalFileStorage`` on 3.x). A string with ``://`` is an RDB URL, passed on."""
    optuna = import_optuna()
    if "://" in str(path):
        return str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except ImportError:  # Optuna 3.x
        return optuna.storages.JournalStorage(optuna.storages.JournalFileStorage(str(path)))


def best_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    return apply_overrides(base, params)


def write_best(study, base: TrainConfig, out: Path) -> dict | None:
    """``OUT/best.toml`` (the configuration of the study's best trial) and ``OUT/best.json``; None if no trial finished."""
    optuna = import_optuna()
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    best = max(done, key=lambda t: t.value)
    cfg = best_config(base, best.params)
    header = (f"# best trial of study {study.study_name!r}: trial {best.number}, value {best.value:.6g}"
              f" (validation 'primary', higher is better)\n# searched: " + ", ".join(f"{k} = {v!r}" for k, v in best.params.items()) + "\n")
    atomic_write_text(out / "best.toml", header + cfg.to_toml())
    info = {"study": study.study_name, "trial": best.number, "value": best.value, "params": best.params,
            "run_dir": best.user_attrs.get("run_dir"), "n_complete": len(done),
            "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
            "n_failed": sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials)}
    atomic_write_text(out / "best.json", json.dumps(info, indent=2) + "\n")
    return info


def run_study(
    base: TrainConfig,
    space: SearchSpace,
    out: str | Path,
    *,
    study_name: str,
    storage: str | Path,
    trials: int,
    timeout: float | None = None,
    sampler_seed: int | None = None,
    log: Callable[[str], None] = print,
) -> dict | None:
    """One worker of the study: run trials until the study has ``trials`` finished (complete or
    pruned) trials or ``timeout`` seconds passed; returns the best trial's summary (``best.json``)."""
    optuna = import_optuna()
    from .train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=study_name, storage=journal_storage(storage), load_if_exists=True,
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=sampler_seed),
                                pruner=space.make_pruner())
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial) -> float:
        params = space.suggest(trial)
        cfg = best_config(base, params)
        run_dir = out / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        log(f"[TRIAL {trial.number}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()))

        def on_epoch(epoch: int, record: dict) -> None:
            value = float(record["primary"])
            if not math.isfinite(value):
                raise optuna.TrialPruned(f"non-finite validation metric at epoch {epoch}")
            trial.report(value, epoch)
            log(f"[TRIAL {trial.number}] epoch {epoch} {record['val_primary']}={value:.4f}")
            if trial.should_prune():
                log(f"[TRIAL {trial.number}] pruned after epoch {epoch}")
                raise optuna.TrialPruned(f"pruned after epoch {epoch} ({record['val_primary']} = {value:.4g})")

        with open(run_dir / "train.log", "a") as fh:
            summary = train(cfg, run_dir, log=lambda s: (fh.write(s + "\n"), fh.flush()), on_epoch=on_epoch)
        value = float(summary["best"])
        log(f"[TRIAL {trial.number}] done: best {summary.get('val_primary', 'primary')} = {value:.4f}")
        return value

    def stop_at_total(study, trial) -> None:
        if sum(t.state in counted for t in study.trials) >= trials:
            study.stop()

    # A trial whose configuration cannot train (e.g. width not divisible by heads, out of memory)
    # is recorded as FAIL and the worker goes on.
    if sum(t.state in counted for t in study.trials) >= trials:
        log(f"[HPO] study {study_name!r} already has {trials} finished trials; nothing to run")
        return write_best(study, base, out)
    study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=[stop_at_total],
                   catch=(ValueError, RuntimeError, AssertionError))
    info = write_best(study, base, out)
    if info is None:
        log(f"[HPO] study {study_name!r}: no completed trial yet")
    else:
        log(f"[HPO] study {study_name!r}: best trial {info['trial']} value {info['value']:.4f} "
            f"({info['n_complete']} complete, {info['n_pruned']} pruned, {info['n_failed']} failed) -> {out / 'best.toml'}")
    return info
