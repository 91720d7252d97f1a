"""The network's forward pass as a captured CUDA graph, for small batches at inference.

A single scene through the ``spectrum`` network launches about 2 300 CUDA kernels, each a few
microseconds of GPU work but 10-20 microseconds of Python and operator dispatch on the host: one
scene is bound by the host (benchmarks/results/h100/one-scene-profile-15dfe39). A CUDA graph
(``torch.cuda.CUDAGraph``) records the kernels of one call once and replays them with a single
launch. :func:`graphed_forward` keeps one graph per model, batch signature (the shapes and dtypes
of every input tensor) and options: the first call with a new signature runs the forward twice
on a side stream (warm-up: cuDNN's and risloc's caches are filled outside the capture), captures
a third run, and every later call copies its inputs into the graph's input buffers, replays it
and returns a copy of the outputs. The answers are those of the eager forward (the same kernels).

Only for CUDA batches of at most :data:`GRAPH_MAX_SCENES` scenes (each graph keeps its own
memory; large batches are not launch-bound), outside autograd, with the model in eval mode. A
capture that fails (an operation that waits for the device, or one CUDA graphs do not support)
raises, naming the cause: set :data:`GRAPH_MAX_SCENES` to 0 to run the forward eagerly.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

GRAPH_MAX_SCENES = 8
"""CUDA batches of at most this many scenes run the network's forward pass as a replayed CUDA
graph (:func:`graphed_forward`); 0 runs every forward eagerly."""

_MAX_GRAPHS = 16
"""Graphs kept at most (the oldest is dropped first)."""

_GRAPHS: dict[tuple, "_Graph"] = {}


def tree_map(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it: tensors, dataclasses (field by field),
    tuples, lists and dicts are walked; anything else is kept as it is."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: tree_map(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(fn, v) for v in obj)
    if isinstance(obj, dict):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    return obj


def tree_tensors(obj: Any) -> list[Tensor]:
    """Every tensor in ``obj``, in the order :func:`tree_map` visits them."""
    out: list[Tensor] = []
    tree_map(lambda t: out.append(t) or t, obj)
    return out


def signature(obj: Any) -> tuple:
    """Shapes, dtypes and devices of the tensors in ``obj`` and where they are (None fields differ)."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tree_tensors(obj)) + (repr(tree_map(lambda t: 0, obj)),)


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Any
    outputs: Any
    model: weakref.ReferenceType


def graphable(model: torch.nn.Module, batch: int, device: torch.device) -> bool:
    """Whether :func:`graphed_forward` would replay a graph for this call."""
    return (device.type == "cuda" and 0 < batch <= GRAPH_MAX_SCENES and not model.training
            and not torch.is_grad_enabled() and not torch.is_inference_mode_enabled())


def graphed_forward(model: torch.nn.Module, call: Callable[[Any], Any], inputs: Any, key: tuple) -> Any:
    """``call(inputs)`` (a forward pass of ``model``) through a CUDA graph captured for ``model``,
    the signature of ``inputs`` and ``key`` (the call's other arguments); see the module docstring."""
    full_key = (id(model), signature(inputs), key)
    entry = _GRAPHS.get(full_key)
    if entry is not None and entry.model() is not model:  # another model at a recycled id
        entry = None
    if entry is None:
        entry = _capture(model, call, inputs)
        if len(_GRAPHS) >= _MAX_GRAPHS:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        _GRAPHS[full_key] = entry
    for buf, new in zip(tree_tensors(entry.inputs), tree_tensors(inputs)):
        buf.copy_(new)
    entry.graph.replay()
    return tree_map(torch.clone, entry.outputs)


def _capture(model: torch.nn.Module, call: Callable[[Any], Any], inputs: Any) -> _Graph:
    static = tree_map(torch.clone, inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            outputs = call(static)
    except RuntimeError as exc:
        raise RuntimeError(f"capturing the network's forward pass as a CUDA graph failed ({exc}); "
                           "set risloc.nn.graphs.GRAPH_MAX_SCENES = 0 to run it eagerly") from exc
    return _Graph(graph, static, outputs, weakref.ref(model))
