"""risloc._devices: the library of torch's batched factorisations while an estimator runs on CUDA.

The setting itself is torch's (``torch.backends.cuda.preferred_linalg_library``); these tests
replace it by a recorder, so they check risloc's use of it on any machine: set to cuSOLVER for
CUDA bodies only, restored after (also after an error), a user's own choice kept, torch's one-time
C++ warning about it not shown, and the registry running its batches inside it. On a GPU the
graphed batch test of tests/test_cuda_graphs.py runs a batch that MAGMA would take."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import risloc
from risloc import _devices, estimators

DEFAULT = torch._C._LinalgBackend.Default
CUSOLVER = torch._C._LinalgBackend.Cusolver
CUDA = torch.device("cuda")


class Recorder:
    """Stands in for ``torch.backends.cuda.preferred_linalg_library``: keeps the choice, records
    every change, and writes to file descriptor 2 when set away from the default (as torch does
    once per process)."""

    def __init__(self, current=DEFAULT):
        self.current, self.changes = current, []

    def __call__(self, backend=None):
        if backend is not None:
            value = {"cusolver": CUSOLVER, "default": DEFAULT}.get(backend, backend)
            self.changes.append(value)
            if value != DEFAULT:
                os.write(2, b"torch: preferred_linalg_library is an experimental feature\n")
            self.current = value
        return self.current


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch.backends.cuda, "preferred_linalg_library", rec)
    monkeypatch.setattr(_devices, "_cusolver_set", False)
    return rec


def test_cusolver_on_cuda_only_and_restored(recorder, capfd):
    with _devices.cuda_factorisations(torch.device("cpu")):
        assert recorder.current == DEFAULT
    assert recorder.changes == []
    with _devices.cuda_factorisations(CUDA):
        assert recorder.current == CUSOLVER
        os.write(2, b"the body's own output\n")
    assert recorder.current == DEFAULT and recorder.changes == [CUSOLVER, DEFAULT]
    err = capfd.readouterr().err
    assert "the body's own output" in err and "experimental" not in err  # only the setting's notice is dropped
    with pytest.raises(KeyError), _devices.cuda_factorisations(CUDA):
        raise KeyError("an estimator's error")
    assert recorder.current == DEFAULT


def test_a_users_own_choice_is_kept(recorder):
    recorder.current = torch._C._LinalgBackend.Magma
    with _devices.cuda_factorisations(CUDA):
        assert recorder.current == torch._C._LinalgBackend.Magma
    assert recorder.changes == []
    recorder.current = DEFAULT
    with _devices.cuda_factorisations(CUDA), _devices.cuda_factorisations(CUDA):  # nested: the outer one sets it
        assert recorder.current == CUSOLVER
    assert recorder.changes == [CUSOLVER, DEFAULT]


def test_the_registry_runs_its_batches_inside_it(monkeypatch):
    entered, inside = [], []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        inside.append(True)
        try:
            yield
        finally:
            inside.append(False)

    def toy(scenes, **_):
        assert inside[-1], "the estimator ran outside the factorisation setting"
        return risloc.Estimates.empty(len(scenes), scenes.scenario.k_max, method="toy")

    monkeypatch.setattr(estimators, "cuda_factorisations", recording)
    estimators.register("devices-test-toy")(toy)
    try:
        scenes = risloc.simulate(risloc.Scenario(), 5, seed=3)
        out = risloc.locate(scenes, "devices-test-toy", batch=2)
    finally:
        estimators._REGISTRY.pop("devices-test-toy"), estimators._INFO.pop("devices-test-toy")
    assert len(out) == 5 and entered == [torch.device("cpu")] and inside == [True, False]


def test_a_process_without_a_standard_error_still_gets_the_setting(recorder, monkeypatch):
    def no_descriptor(fd):
        raise OSError("bad file descriptor")

    monkeypatch.setattr(_devices.os, "dup", no_descriptor)
    with _devices.cuda_factorisations(CUDA):
        assert recorder.current == CUSOLVER
    assert recorder.current == DEFAULT
