"""Small batches on CUDA as replayed CUDA graphs: the network's forward pass and ``ml``'s refinement.

One scene through ``learned`` launches thousands of CUDA kernels, each a few microseconds of GPU
work but 10-20 microseconds of Python and operator dispatch on the host: one scene is bound by
the host (benchmarks/results/h100/one-scene-profile-15dfe39). A CUDA graph
(``torch.cuda.CUDAGraph``) records the kernels of one call once and replays them with a single
launch. :func:`graphed` keeps one graph per call site, signature of the inputs (the shapes,
dtypes and devices of every tensor in them) and key (the call's other arguments, which the
graph bakes in); the first call with a new signature runs the call twice on a side stream
(warm-up: cuDNN's and risloc's caches are filled outside the capture), captures a third run,
and every later call copies its inputs into the graph's input buffers, replays the graph and
returns a copy of its outputs. The answers are those of the eager call (the same kernels).

Used for CUDA batches of at most :data:`GRAPH_MAX_SCENES` scenes (each graph keeps its own
memory; large batches are not launch-bound), outside autograd: the spectrum network's forward
pass (:func:`risloc.nn.inference.run_model`) and ``ml``'s stages (:mod:`risloc.estimators.ml`:
the whole ``init`` path, the search path up to the selected order and the selected model's
re-search and refinement), whose loops have fixed counts and read no device value. A graphed
call made while another is being captured runs inside that capture (one graph for both).
A capture that fails (an operation that waits for the device, or one CUDA graphs do not
support) raises, naming the cause: set :data:`GRAPH_MAX_SCENES` to 0 to run everything eagerly.

A graph reads the memory its kernels were recorded with. Tensors that a call takes from a
module-level cache (the dictionaries of :mod:`risloc.grids`, the network's grids) live outside
the graph's memory: such caches are registered with :func:`register_cache`, and every graph
keeps the tensors those caches held when it was captured, so that clearing a cache cannot free
memory a graph still reads. They are filled through :func:`cache_entry`, outside inference mode.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from .scenario import Scenario

GRAPH_MAX_SCENES = 8
"""CUDA batches of at most this many scenes run as replayed CUDA graphs (:func:`graphed`); 0
runs everything eagerly."""

_MAX_GRAPHS = 32
"""Graphs kept at most (the oldest is dropped first)."""

_GRAPHS: dict[tuple, "_Graph"] = {}

_CACHES: list[dict] = []

_capturing = False
"""True while :func:`_capture` runs a call (warm-up and capture): nested graphed calls run inside it."""


def register_cache(cache: dict) -> dict:
    """Register a module-level cache of tensors (a dict) whose entries graphed calls may read;
    every graph keeps the entries present at its capture alive (module docstring). Returns ``cache``."""
    _CACHES.append(cache)
    return cache


def cache_entry(cache: dict, key, build: Callable[[], Any], limit: int = 16) -> Any:
    """``cache[key]``, made by ``build()`` on a miss (the cache is emptied first when it holds more
    than ``limit`` entries): the one way risloc's module-level caches of tensors are filled.

    The entry is built with inference mode off, even inside an estimator's call (which runs in
    inference mode on the CPU, :meth:`risloc.estimators.Estimator.__call__`): a cached tensor made
    there would be an inference tensor, which autograd refuses to save for a backward pass, so a
    training step run after an estimator in the same process would fail on it."""
    if key not in cache:
        if len(cache) > limit:
            cache.clear()
        with torch.inference_mode(False):
            cache[key] = build()
    return cache[key]


def tree_map(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it: tensors, dataclasses (field by field),
    tuples, lists and dicts are walked; anything else, and a :class:`~risloc.scenario.Scenario`
    (no tensors), is kept as it is."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Scenario):  # no tensors in it: kept as it is (its repr is part of a signature)
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: tree_map(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(fn, v) for v in obj)
    if isinstance(obj, dict):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    return obj


def _flatten(obj: Any) -> tuple[list[Tensor], tuple]:
    """One walk of ``obj`` (:func:`tree_map`): its tensors in visiting order and its signature, the
    shapes, dtypes and devices of those tensors and where they are (a None field differs)."""
    leaves: list[Tensor] = []
    skeleton = tree_map(lambda t: leaves.append(t) or 0, obj)
    return leaves, tuple((tuple(t.shape), t.dtype, t.device) for t in leaves) + (repr(skeleton),)


def tree_tensors(obj: Any) -> list[Tensor]:
    """Every tensor in ``obj``, in the order :func:`tree_map` visits them."""
    return _flatten(obj)[0]


def signature(obj: Any) -> tuple:
    """Shapes, dtypes and devices of the tensors in ``obj`` and where they are (None fields differ)."""
    return _flatten(obj)[1]


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]
    """The graph's input buffers, in the order :func:`_flatten` visits the inputs."""
    outputs: Any
    owner: Callable[[], Any] | None
    keep: tuple = ()
    """The entries of the registered caches at capture time (:func:`register_cache`)."""


def graphable(batch: int, device: torch.device, model: torch.nn.Module | None = None) -> bool:
    """Whether :func:`graphed` should replay a graph for a call on ``batch`` scenes on ``device``
    (CUDA, at most :data:`GRAPH_MAX_SCENES` scenes, autograd off, ``model`` in eval mode and
    capturable: a network whose forward pass waits for the device, e.g. through
    ``torch.linalg.eigh``, which synchronises on CUDA, says so with a class attribute
    ``capturable = False``)."""
    if model is not None and (model.training or not getattr(model, "capturable", True)):
        return False
    return (device.type == "cuda" and 0 < batch <= GRAPH_MAX_SCENES and not torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled())


def graphed(call: Callable[[Any], Any], inputs: Any, key: tuple, owner: Any = None) -> Any:
    """``call(inputs)`` through a CUDA graph captured for ``key`` (the call site and the arguments
    it bakes in), the signature of ``inputs`` and ``owner`` (an object whose state the call reads
    in place, e.g. the network: its parameters); see the module docstring. ``inputs``: tensors,
    dataclasses, tuples, lists or dicts of them (:func:`tree_map`); so is the returned copy.
    Called while another call is being captured, ``call(inputs)`` runs as it is (into that graph)."""
    if _capturing:
        return call(inputs)
    leaves, sig = _flatten(inputs)
    full_key = (None if owner is None else id(owner), sig, key)
    entry = _GRAPHS.get(full_key)
    if entry is not None and entry.owner is not None and entry.owner() is not owner:  # another owner at a recycled id
        entry = None
    if entry is None:
        entry = _capture(call, inputs, owner)
        if len(_GRAPHS) >= _MAX_GRAPHS:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        _GRAPHS[full_key] = entry
    for buf, new in zip(entry.inputs, leaves):
        buf.copy_(new)
    entry.graph.replay()
    return tree_map(torch.clone, entry.outputs)


def _capture(call: Callable[[Any], Any], inputs: Any, owner: Any) -> _Graph:
    global _capturing
    static = tree_map(torch.clone, inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    _capturing = True
    try:
        with torch.cuda.stream(side):
            for _ in range(2):
                call(static)
        torch.cuda.current_stream().wait_stream(side)
        keep = tuple(v for cache in _CACHES for v in cache.values())
        with torch.cuda.graph(graph):
            outputs = call(static)
    except RuntimeError as exc:
        raise RuntimeError(f"capturing a small CUDA batch as a CUDA graph failed ({exc}); "
                           "set risloc.cuda_graphs.GRAPH_MAX_SCENES = 0 to run it eagerly") from exc
    finally:
        _capturing = False
    return _Graph(graph, tree_tensors(static), outputs, None if owner is None else weakref.ref(owner), keep)
