"""Roofline of the ``learned`` estimator, stage by stage: FLOPs and bytes per scene, achieved
TFLOP/s and GB/s against the GPU's peaks, and what bounds each stage.

    PYTHONPATH=src python3 benchmarks/roofline_learned.py --device cuda --batch 1024 --out roofline.json
    PYTHONPATH=src python3 benchmarks/roofline_learned.py --device cpu --batch 4 --repeats 1

On ``--scenes`` simulated scenes of ``--seed`` (default: the validation seed 1000) with the packaged
model (``--checkpoint``; or ``--config TOML``: an untrained network of that configuration, with
``--set scenario.FIELD=VALUE`` / ``--set model.FIELD=VALUE`` overrides, for small runs), one
batch of ``--batch`` scenes goes through ``learned``'s stages (:mod:`risloc.nn.inference`):

* ``front_end``: the matched-filter spectra and ``pursuit`` picks
  (:func:`risloc.nn.networks.spectrum.matched_filter_spectra`);
* ``network``: the 3-D U-Net, its heads, the decoding, the K head, the factor and its effective
  covariance (the forward with the front end's output given);
* ``start``: the K decision and ``learned``'s start (the K-hat + ``LEARNED_OVER`` strongest detections);
* ``likelihood_stage``: ``ml``'s ``init`` path with ``learned``'s options (refinement, RELAX of
  the weakest source, pruning), and three of its pieces, each timed alone on the arguments of its
  first call in the stage: ``likelihood_eval`` (one evaluation of the likelihood with its
  gradient and Fisher matrix), ``dictionary`` (the dictionary's atom norms and its products with
  y) and ``scan`` (one dictionary scan of a RELAX re-search);
* ``end_to_end``: all of the above from the scenes (inputs included).

Symbols (per scene): L snapshots, M base-station antennas, N RIS elements, Q_f atoms of the
network's grid, J = ``pursuit`` picks, Q_d atoms of the likelihood stage's dictionary
(``LEARNED_GRID`` of the signal model), K = K_max slots, n the slots in use at a scan, T = ``top``;
s = 3 where a dictionary product runs as the split-TF32 ("3xTF32") product on the tensor cores
(:func:`risloc.grids.dictionary_product`, :func:`risloc.grids.atom_norms`: [x_hi, x_hi, x_lo] times
[D_hi; D_lo; D_hi], three TF32 products in one), s = 1 where it runs as a complex matmul (CPU).
A complex multiply-add is 8 real FLOPs, so a complex [R, N] x [N, Q] product is 8 R N Q real
FLOPs (s x that on the tensor cores). FLOPs are real FLOPs executed, "useful" FLOPs count each
complex product once (s = 1).

Analytic FLOPs ("products": the matmul-type products that the counted check below sees; "other":
the Cholesky factorisations and triangular solves, and estimates of the elementwise passes):

* front end: atom norms |phi_lq|^2 = |G_l d_q|^2 as one [L M, N] x [N, Q_f] complex product,
  s 8 L M N Q_f; the matched filter of y and of the basis vector of every pick but the last (whose
  spectrum is not returned), J' = max(J - 1, 0), (1 + J') products [L, N] x [N, Q_f],
  s 8 L N Q_f (1 + J'); the back-projections G_l^H v and the picks' measured vectors G_l d_q,
  8 L M N (1 + J' + J). Products s 8 L N Q_f (M + 1 + J') + 8 L M N (1 + J' + J);
  other ~ 4 L M Q_f (the norm's squares and sums) + (10 + 30 J') L Q_f (the spectra and the
  pursuit's updates).
* network (w = width, d = depth, C = input channels, c_q cells at level q: c_0 = Q_f,
  c_1 = Q_f / 8, c_2 = Q_f / 64): every 3 x 3 x 3 convolution 2 * 27 C_in C_out c_out, every
  2 x 2 x 2 transposed one 2 * 8 C_in C_out c_in, the 1 x 1 x 1 head 2 * 5 w Q_f, the linear
  layers 2 n_in n_out (biases, normalisation and activations not counted, as in
  ``torch.utils.flop_counter.FlopCounterMode``, the cross-check); total
  2 * 27 [(C w + 6 w^2) c_0 + 26 w^2 c_1 + (8 + 32 d) w^2 c_2] + 2 * 8 * 8 w^2 c_2
  + 2 * 8 * 2 w^2 c_1 + 2 * 5 w c_0 + MLPs (stem, enc0, merge0, dec0 at c_0; down1, enc1,
  merge1, dec1 at c_1; down2 and the 2 d bottleneck convolutions at c_2; the transposed up2, up1;
  the head), 2.19 GFLOP per scene for the shipped network (C = 31, w = 32, d = 2, Q_f = 3 456).
* one likelihood evaluation with derivatives (:func:`risloc.estimators.ml_core.stochastic_eval`):
  the measured steering vectors and derivatives V_l = G_l [A, dA] (4K columns), 32 L M N K; C_l,
  8 L M^2 K; C_l^-1 y_l, 8 L M^2; C^-1 V, 32 L M^2 K; W = V^H C^-1 V, 128 L K^2 M, and the first K rows of V^H C^-2 V, 32 L K^2 M;
  V^H z, 32 L K M; on CUDA the inverse's product Li^H Li, 8 L M^3; other: the Cholesky factor
  (8/3) L M^3 and the triangular inverse 4 L M^3 (CUDA; ``cholesky_inverse`` on the CPU, the
  same count taken) and the Fisher matrix's products, 2 * 8 L (4K)^2 (two of the four trace terms
  are the conjugates of the other two). Without derivatives
  (the pruning's trial models): V = G A only, 8 L M N K + 8 L M^2 K + 8 L M^2 (+ 8 L M^3 CUDA).
* the dictionary (:func:`risloc.estimators.ml._measured_dictionary`): s 8 L M N Q_d (atom norms)
  + s 8 L N Q_d + 8 L M N (its products with y); other 4 L M Q_d.
* one scan (:func:`risloc.estimators.ml._add_stochastic`, n slots in use): G_l A, 8 L M N n;
  B^H B, 8 L n^2 M; the triangular solve 4 L n^2 M (other); the back-projections 8 L n M N; the
  dictionary product s 8 L n N Q_d; Lc^-1 B^H y and its products, 8 L n M + 8 L n Q_d; other
  ~ 40 L Q_d (the gains' screening) + 9 * 10 L T (the exact gains of the T best).
* the likelihood stage: the sum over the calls of the pieces above that one run of the stage
  makes (counted per call by wrapping ``ml``'s functions: evaluations with and without
  derivatives, dictionaries, scans), i.e. the solves of the P x P Fisher systems (P = 4K + 1),
  the start's least-squares powers and the range decision are left out (O(P^3) per step).

Analytic bytes (each tensor read and written at least once, 4 bytes a float32, 8 a complex64;
the dictionary, shared by the batch, is not counted per scene):

* front end: y, H, codes (8 (L M + M N + L N)); the atom norms' split operand [L M, 6N] and
  result [L M, 2 Q_f] float32, each written and read (2 * 4 L M (6 N + 2 Q_f)) and the norms
  (4 L Q_f, written and read); the matched filter t and the spectra (8 L Q_f + 4 L Q_f written
  and read); per pick the product e^H phi (8 L Q_f written and read) and the updates of t and
  |P phi|^2 (read and written: 16 + 8) and the floor (4) per (l, q); outputs S and c,
  4 (J + L) Q_f.
* network: each convolution reads its input activation and writes its output (4 bytes each,
  normalisation and activation fused into it), plus the weights divided by the batch.
* likelihood pieces: their inputs (y, H, codes) and the products' operands and results, each
  written and read: an evaluation reads the stacked maps G_l = H diag(c_l) [L M, N] (made once per
  ``ml`` call: 8 (L M N) written, counted once in the stage) and writes and reads V, C^-1 V, C, its factor and
  inverse, W and the first K rows of V^H C^-2 V; the dictionary's split operands [L M, 6N] and [L, 6N] and results
  [L M, 2 Q_d] and [L, 2 Q_d], then n2 and c written ((4 + 8) L Q_d); a scan's split operand
  [L n, 6N], its products [L, n, Q_d] complex, the n2 and c it reads and four [L, Q_d] float32
  gain arrays.

Counted (an independent check, from the shapes of the operations that actually run, on the
device and batch of the run): ``torch.utils.flop_counter.FlopCounterMode`` on the network; a
dispatch-mode counter (:class:`OpCounter`) on every stage, which adds up the matmul FLOPs
(2 m k n per real product, 8 m k n per complex one), the convolutions' FLOPs, the bytes of every
operation's inputs and outputs (``bytes_eager``: what the eager code reads and writes, with no
cache reuse), the operations run (about one kernel launch each) and the values the host reads
back (``host_reads``: ``int``/``bool``/``item`` of a tensor, data-dependent output sizes); on CUDA
also the host synchronisations per call that ``torch.cuda.set_sync_debug_mode`` reports.

Timing (``--device cuda``): each stage after ``--warmup`` calls, ``--repeats`` calls, each between
two CUDA events (the host waits for the end event), the median; the same on one scene (the
latency floor: at batch B a stage that only waits for launches and synchronisations costs
t(1 scene) / B per scene). On the CPU: ``time.perf_counter``.

Peaks (NVIDIA H100 Tensor Core GPU datasheet, H100 SXM5, dense, without sparsity): BF16/FP16
tensor 989 TFLOP/s, TF32 tensor 494 TFLOP/s, FP32 (CUDA cores) 67 TFLOP/s, HBM3 3.35 TB/s;
an H200 has the same compute and 4.8 TB/s (H200 datasheet). ``--peaks measured`` (the
default on the CPU) measures them on the machine instead (:func:`measured_peaks`): the float32
matrix-product rate (a 2 048 x 2 048 product, on the CPU the faster of MKL and oneDNN) for the
products and the other FLOPs alike, the bandwidth of a 256 MiB copy, and the cost of
dispatching one operator (a tiny addition); the record keeps the GPU's key names for these
(``tf32_tensor_tflops``, ``fp32_tflops``, ``hbm_tbs``) and adds ``op_us``. The products and the network's
convolutions run on the TF32 tensor cores (split-TF32 products; cuDNN's float32 convolutions
with ``torch.backends.cudnn.allow_tf32``, PyTorch's default), everything else on the FP32 cores.
Per stage: t_compute = products / TF32 peak + other / FP32 peak, t_memory = bytes_eager / HBM
bandwidth; the stage is compute- or memory-bound by the larger where the measured time is within
3 x of it; else launch/latency-bound (its kernels too small or too many to fill the GPU), unless
the one-scene latency floor explains less than half of its time: then "kernel efficiency" (large
kernels running below both roofs). With a measured dispatch cost, t_dispatch = the operators one
call dispatches (views not counted) x ``op_us`` / scenes: the host's floor for them, without the
Python between them. The stages are timed in the grad mode of the registry on that device (inference mode off CUDA,
:func:`risloc.estimators.uses_inference_mode`). Prints the table and one JSON record (``--out``
writes it atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import risloc
from risloc._files import atomic_write_text
from risloc._provenance import git_commit
from risloc.estimators import ml as ml_module
from risloc.estimators import uses_inference_mode
from risloc.nn import inference as inf
from risloc.nn.inputs import forward, prepare_inputs
from risloc.nn.networks import build_model, get_network
from risloc.nn.networks import spectrum
from risloc.nn.networks.spectrum import matched_filter_spectra

PEAKS = {
    "H100 SXM": {"bf16_tensor_tflops": 989.0, "tf32_tensor_tflops": 494.0, "fp32_tflops": 67.0, "hbm_tbs": 3.35,
                 "source": "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5, dense)"},
    "H200": {"bf16_tensor_tflops": 989.0, "tf32_tensor_tflops": 494.0, "fp32_tflops": 67.0, "hbm_tbs": 4.8,
             "source": "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM, dense)"},
}
"""Peak rates used for the roofline (module docstring)."""

LATENCY_FACTOR = 3.0
"""A stage slower than this many times its compute and memory floors is called launch/latency-bound."""

C64, F32 = 8, 4  # bytes of a complex64 and of a float32 value


# ----------------------------------------------------------------------------------------------
# analytic counts (module docstring)
# ----------------------------------------------------------------------------------------------
@dataclass
class Count:
    """Analytic FLOPs (``products``: matmul-type, on the tensor cores where s = 3; ``other``) and bytes per scene."""

    products: float = 0.0
    other: float = 0.0
    bytes: float = 0.0
    useful: float = 0.0
    """The products' FLOPs with each complex product counted once (no split)."""

    @property
    def flops(self) -> float:
        return self.products + self.other

    def __add__(self, o: "Count") -> "Count":
        return Count(self.products + o.products, self.other + o.other, self.bytes + o.bytes, self.useful + o.useful)

    def __mul__(self, k: float) -> "Count":
        return Count(self.products * k, self.other * k, self.bytes * k, self.useful * k)


def front_end_count(L: int, M: int, N: int, Q: int, J: int, split: bool, keep: bool = False) -> Count:
    """The matched-filter front end with J pursuit picks on Q atoms (module docstring); ``keep``:
    it also writes its measured dictionary (|phi|^2 and y^H phi, (4 + 8) L Q bytes) for the stage."""
    s = 3 if split else 1
    Jp = max(J - 1, 0)  # picks whose basis vector is matched with the dictionary (not the last)
    dico = 8 * L * N * Q * (M + 1 + Jp)
    small = 8 * L * M * N * (1 + Jp + J)
    other = 4 * L * M * Q + (10 + 30 * Jp) * L * Q
    io = C64 * (L * M + M * N + L * N)
    norms = 2 * F32 * L * M * (6 * N + 2 * Q) + 2 * F32 * L * Q
    first = 2 * (C64 + F32) * L * Q
    picks = Jp * (2 * C64 + 16 + 8 + 4) * L * Q
    out = F32 * (J + L) * Q + ((F32 + C64) * L * Q if keep else 0)
    return Count(s * dico + small, other, io + norms + first + picks + out, dico + small)


def _conv_ops(c_in: int, w: int, depth: int, shape: tuple[int, int, int]):
    """(FLOPs, activation bytes) of the U-Net's convolutions per scene."""
    c0 = shape[0] * shape[1] * shape[2]
    c1, c2 = c0 // 8, c0 // 64
    layers = [  # (C_in, C_out, kernel volume, cells in, cells out)
        (c_in, w, 27, c0, c0), (w, w, 27, c0, c0), (w, w, 27, c0, c0),  # stem, enc0
        (w, 2 * w, 27, c0, c1), (2 * w, 2 * w, 27, c1, c1), (2 * w, 2 * w, 27, c1, c1),  # down1, enc1
        (2 * w, 4 * w, 27, c1, c2),  # down2
        *[(4 * w, 4 * w, 27, c2, c2)] * (2 * max(1, depth)),  # mid
        (4 * w, 2 * w, 8, c2, c1),  # up2 (transposed: every input cell meets the whole kernel)
        (4 * w, 2 * w, 27, c1, c1), (2 * w, 2 * w, 27, c1, c1), (2 * w, 2 * w, 27, c1, c1),  # merge1, dec1
        (2 * w, w, 8, c1, c0),  # up1
        (2 * w, w, 27, c0, c0), (w, w, 27, c0, c0), (w, w, 27, c0, c0),  # merge0, dec0
        (w, 5, 1, c0, c0),  # head
    ]
    flops = sum(2 * ci * co * k * (cin if k == 8 else cout) for ci, co, k, cin, cout in layers)
    act = sum(F32 * (ci * cin + co * cout) for ci, co, k, cin, cout in layers)
    return flops, act


def network_count(model, batch: int) -> Count:
    """The ``spectrum`` network's forward per scene (module docstring): the convolutions and linear
    layers; bytes: the convolutions' activations and the weights over ``batch`` scenes."""
    cfg, w = model.cfg, model.cfg.width
    flops, act = _conv_ops(model.c_in, w, cfg.depth, model.shape)
    n_scene = 2 + cfg.pursuit
    k_max = model.k_max
    n_k = 8 * w + 2 * k_max + n_scene
    mlp = 2 * ((4 * w + n_scene) * 4 * w + 16 * w * w) + 2 * (n_k * cfg.k_hidden + cfg.k_hidden ** 2 + cfg.k_hidden * k_max)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return Count(flops + mlp, 0.0, act + weights / batch, flops + mlp)


def eval_count(L: int, M: int, N: int, K: int, derivatives: bool, cuda: bool) -> Count:
    """One evaluation of the stochastic likelihood on K slots (module docstring)."""
    inv = 8 * L * M ** 3 if cuda else 0
    chol = (8 / 3 + 4) * L * M ** 3
    io = C64 * (L * M + L * M * N)  # y and the stacked maps G_l
    if not derivatives:
        prod = 8 * L * M * N * K + 8 * L * M * M * K + 8 * L * M * M + inv
        return Count(prod, chol, io + 2 * C64 * (L * M * K + 3 * L * M * M), prod)
    V = 4 * K
    prod = 8 * L * M * N * V + 8 * L * M * M * K + 8 * L * M * M + 8 * L * M * M * V + 8 * L * V * V * M + 8 * L * K * V * M + 8 * L * V * M + inv
    other = chol + 2 * 8 * L * V * V
    byt = io + 2 * C64 * (2 * L * M * V + 3 * L * M * M + L * V * V + L * K * V)
    return Count(prod, other, byt, prod)


def maps_count(L: int, M: int, N: int) -> Count:
    """The stacked maps G_l = H diag(c_l) of one ``ml`` call: H and the codes read, G written."""
    return Count(0, 6 * L * M * N, C64 * (M * N + L * N + L * M * N), 0)


def dictionary_count(L: int, M: int, N: int, Q: int, split: bool) -> Count:
    """The likelihood stage's dictionary: atom norms and products with y (module docstring)."""
    s = 3 if split else 1
    dico = 8 * L * M * N * Q + 8 * L * N * Q
    small = 8 * L * M * N
    byt = C64 * (L * M + M * N + L * N) + 2 * F32 * L * M * (6 * N + 2 * Q) + 2 * F32 * L * (6 * N + 2 * Q) + (F32 + C64) * L * Q
    return Count(s * dico + small, 4 * L * M * Q, byt, dico + small)


def scan_count(L: int, M: int, N: int, Q: int, n: int, top: int, split: bool) -> Count:
    """One dictionary scan with n slots in use (module docstring)."""
    s = 3 if split else 1
    dico = 8 * L * n * N * Q
    small = 8 * L * M * N * n + 8 * L * n * n * M + 8 * L * n * M * N + 8 * L * n * M + 8 * L * n * Q
    other = 4 * L * n * n * M + 40 * L * Q + 90 * L * top
    byt = C64 * (L * M + M * N + L * N) + 2 * F32 * L * n * 6 * N + 2 * C64 * L * n * Q + (F32 + C64) * L * Q + 4 * F32 * L * Q
    return Count(s * dico + small, other, byt, dico + small)


# ----------------------------------------------------------------------------------------------
# counted: the operations that run
# ----------------------------------------------------------------------------------------------
_HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave")
"""Operations whose result the host must wait for (a value read by ``int``/``bool``/``item``, or an
output whose size depends on the data): each is a host synchronisation on CUDA."""


class OpCounter(TorchDispatchMode):
    """Adds up, for every ATen operation that runs inside it: the operations (``ops``), the matmul
    FLOPs (2 m k n per real product, 8 m k n per complex one, and oneDNN's 1 x 1 x 1 convolutions,
    the atom norms' product on the CPU: ``matmul_flops``), the convolutions' FLOPs
    (``conv_flops``, as ``FlopCounterMode``), the bytes of its tensor inputs and outputs
    (``bytes``; views and allocations move nothing and are skipped; an expanded input counts its
    storage at most), the linear-algebra calls by name (``linalg``) and the operations that make
    the host wait for the device (``host_reads``, :data:`_HOST_READS`)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.matmul_flops = 0
        self.conv_flops = 0
        self.bytes = 0
        self.linalg: Counter = Counter()
        self.host_reads = 0

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        n = t.numel() * t.element_size()
        try:
            return min(n, t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            return n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _HOST_READS:
            self.host_reads += 1
        if func.is_view or name.startswith("empty") or name in ("detach", "alias", "lift_fresh", "_local_scalar_dense"):
            return out
        self.ops += 1
        cplx = 4 if any(isinstance(a, torch.Tensor) and a.is_complex() for a in args[:3]) else 1
        if name in ("mm", "addmm"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.matmul_flops += cplx * 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif name in ("bmm", "baddbmm"):
            a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
            self.matmul_flops += cplx * 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        elif name in ("mv", "addmv", "dot", "vdot"):
            a = args[0] if name in ("mv", "dot", "vdot") else args[1]
            self.matmul_flops += cplx * 2 * a.numel()
        elif name in ("convolution", "_convolution"):
            self.conv_flops += conv_flop_count(list(args[0].shape), list(args[1].shape), list(out.shape), bool(args[6]))
        elif name == "mkldnn_convolution":  # oneDNN on the CPU: a 1 x 1 x 1 kernel is a product (risloc.grids.atom_norms)
            flops = conv_flop_count(list(args[0].shape), list(args[1].shape), list(out.shape), False)
            if math.prod(args[1].shape[2:]) == 1:
                self.matmul_flops += flops
            else:
                self.conv_flops += flops
        elif name.startswith(("linalg_", "cholesky", "triangular_solve")):
            self.linalg[name] += 1
        seen = set()
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and (t.data_ptr(), t.shape) not in seen:
                seen.add((t.data_ptr(), t.shape))
                self.bytes += self._nbytes(t)
        return out


def grad_mode(device):
    """The grad mode the registry runs the package's estimators in on ``device``: inference mode
    off CUDA, else ``no_grad``."""
    return torch.inference_mode() if uses_inference_mode(device) else torch.no_grad()


def count_ops(fn) -> OpCounter:
    c = OpCounter()
    with torch.no_grad(), c:
        fn()
    return c


def host_syncs(fn, device) -> int | None:
    """Host synchronisations of one call of ``fn`` on CUDA (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def median_time(fn, device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls (CUDA events on CUDA),
    in the registry's grad mode (:func:`grad_mode`)."""
    with grad_mode(device):
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# the pipeline and its stages
# ----------------------------------------------------------------------------------------------
@dataclass
class Pipeline:
    model: torch.nn.Module
    options: object
    calibration: inf.Calibration
    scenario: risloc.Scenario
    stage_options: dict


def build_pipeline(args, device) -> Pipeline:
    """The packaged (or ``--checkpoint``) model, or an untrained network of ``--config`` with the ``--set`` overrides."""
    if args.config is None:
        loaded = inf.load_model(args.checkpoint or inf.DEFAULT_WEIGHTS, device=device)
        return Pipeline(loaded.model, loaded.options, loaded.calibration, loaded.config.scenario,
                        inf.stage_options(loaded.config.scenario.signal))
    from risloc.nn.config import config_from_args

    cfg = config_from_args(args)
    torch.manual_seed(0)
    model = build_model(cfg.scenario, cfg.model).to(device).eval()
    return Pipeline(model, cfg.covariance_options(cfg.loss.beta), inf.Calibration(), cfg.scenario, inf.stage_options(cfg.scenario.signal))


def _wrapped(calls: Counter, captured: dict):
    """Patches of ``ml``'s pieces that count their calls (with the slots in use of each scan) and
    keep the arguments of the first call of each; and the original functions."""
    orig = {n: getattr(ml_module, n) for n in ("_evaluate", "_measured_dictionary", "_add_stochastic")}

    def evaluate(state, prob, derivatives=True):
        calls["eval_deriv" if derivatives else "eval_plain"] += 1
        captured.setdefault("eval_deriv" if derivatives else "eval_plain", ((state, prob), {"derivatives": derivatives}))
        return orig["_evaluate"](state, prob, derivatives)

    def dictionary(prob):
        calls["dictionary"] += 1
        captured.setdefault("dictionary", ((prob,), {}))
        return orig["_measured_dictionary"](prob)

    def scan(state, k, dico, prob, s2_grid, top, slots=None):
        first = isinstance(k, int) and k == 0  # the first source of ml's own search (not on learned's path)
        n = ml_module._scan_slots(k, state.phi.shape[1], slots)
        calls["scan_first" if first else f"scan_n{n}"] += 1
        captured.setdefault("scan", ((state, k, dico, prob, s2_grid, top), {"slots": slots}))
        captured.setdefault("scan_slots", n)
        return orig["_add_stochastic"](state, k, dico, prob, s2_grid, top, slots=slots)

    return [mock.patch.object(ml_module, "_evaluate", evaluate), mock.patch.object(ml_module, "_measured_dictionary", dictionary),
            mock.patch.object(ml_module, "_add_stochastic", scan)], orig


def stage_calls(p: Pipeline, scenes, *, capture: bool = False):
    """Zero-argument callables of the stages on ``scenes`` (each stage's inputs computed once),
    and, with ``capture``, the likelihood stage's call counts and pieces."""
    model, options = p.model, p.options
    grid = model.grid(scenes.device)
    cfg = model.cfg
    reuse = inf.reuses_dictionary(p.stage_options, model)  # the stage reads the front end's measured dictionary
    prepare = lambda: dataclasses.replace(  # noqa: E731
        prepare_inputs(scenes.y, scenes.H, scenes.codes, scenes.snr_db, regularisation=options.regularisation), keep_dictionary=reuse)
    with torch.no_grad():
        inputs = prepare()
        feats = model.features(inputs, grid)
        with mock.patch.object(model, "features", lambda i, g: feats):
            pred = forward(model, inputs, options, inf.INFERENCE_AUTOCAST)
        K = inf.count_sources(pred, inputs, options, p.scenario, p.calibration)
        start = inf.over_init(get_network(pred.kind).candidates(pred), K, inf.LEARNED_OVER)

    def network():
        with mock.patch.object(model, "features", lambda i, g: feats):
            return forward(model, inputs, options, inf.INFERENCE_AUTOCAST)

    def start_fn():
        k = inf.count_sources(pred, inputs, options, p.scenario, p.calibration)
        return inf.over_init(get_network(pred.kind).candidates(pred), k, inf.LEARNED_OVER)

    stage = lambda: inf._likelihood_stage(scenes, start, None, p.stage_options, dictionary=feats[2])  # noqa: E731

    def end_to_end():
        inp = prepare()
        pr = forward(model, inp, options, inf.INFERENCE_AUTOCAST)
        k = inf.count_sources(pr, inp, options, p.scenario, p.calibration)
        st = inf.over_init(get_network(pr.kind).candidates(pr), k, inf.LEARNED_OVER)
        return inf._likelihood_stage(scenes, st, None, p.stage_options, dictionary=pr.dictionary)

    out = {"front_end": lambda: matched_filter_spectra(inputs.y, inputs.H, inputs.codes, grid, picks=cfg.pursuit, keep_dictionary=reuse),
           "network": network, "start": start_fn, "likelihood_stage": stage, "end_to_end": end_to_end}
    if not capture:
        return out, None, None
    calls, captured = Counter(), {}
    patches, orig = _wrapped(calls, captured)
    with contextlib.ExitStack() as es, torch.no_grad():
        for pt in patches:
            es.enter_context(pt)
        stage()
    for name, fn in (("likelihood_eval", "eval_deriv"), ("dictionary", "dictionary"), ("scan", "scan")):
        if fn in captured:
            a, kw = captured[fn]
            f = orig["_evaluate" if fn.startswith("eval") else "_measured_dictionary" if fn == "dictionary" else "_add_stochastic"]
            out[name] = (lambda f=f, a=a, kw=kw: f(*a, **kw))
    n_first_scan = captured.get("scan_slots")
    return out, calls, n_first_scan


def analytic(p: Pipeline, batch: int, calls: Counter, n_first_scan: int, device) -> dict[str, Count]:
    """The analytic counts per scene of every stage (module docstring)."""
    sc, model = p.scenario, p.model
    L, M, N, K = sc.snapshots, sc.m_bs, sc.n_elements, sc.k_max
    cuda = device.type == "cuda"
    Qf = model.shape[0] * model.shape[1] * model.shape[2]
    g = p.stage_options["grid_shape"]
    Qd = g[0] * g[1] * g[2]
    top = ml_module.MLOptions().top
    fe = front_end_count(L, M, N, Qf, model.cfg.pursuit, cuda, keep=inf.reuses_dictionary(p.stage_options, model))
    net = network_count(model, batch)
    ev, ev0 = eval_count(L, M, N, K, True, cuda), eval_count(L, M, N, K, False, cuda)
    dico = dictionary_count(L, M, N, Qd, cuda)
    scans = [scan_count(L, M, N, Qd, int(k[len("scan_n"):]), top, cuda) * c for k, c in calls.items() if k.startswith("scan_n")]
    stage = (ev * calls["eval_deriv"] + ev0 * calls["eval_plain"] + dico * calls["dictionary"] + sum(scans, Count())
             + maps_count(L, M, N))
    return {"front_end": fe, "network": net, "start": None, "likelihood_stage": stage, "likelihood_eval": ev, "dictionary": dico,
            "scan": scan_count(L, M, N, Qd, n_first_scan, top, cuda) if n_first_scan is not None else None,
            "end_to_end": fe + net + stage}


def peaks_for(device, name: str = "auto") -> tuple[str | None, dict | None]:
    """The peaks of ``name`` (a key of :data:`PEAKS`, or "measured": :func:`measured_peaks`), or
    with "auto" those of the CUDA device (an H200 by its name, else an H100 SXM; measured on the CPU)."""
    if name == "measured" or (name == "auto" and device.type != "cuda"):
        return "measured", measured_peaks(device)
    if name != "auto":
        return name, PEAKS[name]
    key = "H200" if "H200" in torch.cuda.get_device_name(device) else "H100 SXM"
    return key, PEAKS[key]


def measured_peaks(device) -> dict:
    """The peaks of ``device`` measured on it (module docstring), in the keys of :data:`PEAKS`:
    ``tf32_tensor_tflops`` and ``fp32_tflops`` both the float32 rate of a 2 048 x 2 048 matrix
    product (the median of 5 after one warm-up; on the CPU the faster of ``matmul`` and the same
    product as a 1 x 1 x 1 oneDNN convolution, the two routes of the code's products, and the
    products and the elementwise passes use the same vector units), ``hbm_tbs`` the bandwidth
    of a 256 MiB copy (bytes read and written), and ``op_us`` the median time of one dispatched operator (an addition on a
    one-element tensor, in the registry's grad mode)."""
    def med(f, n):
        f()
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            f()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with grad_mode(device):
        a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
        gemm = 2 * 2048 ** 3 / med(lambda: a @ b, 5)
        if device.type == "cpu" and torch.backends.mkldnn.is_available():  # the same product through oneDNN
            x, w = a.view(1, 2048, 2048, 1, 1), b.view(2048, 2048, 1, 1, 1)
            gemm = max(gemm, 2 * 2048 ** 3 / med(lambda: torch.mkldnn_convolution(x, w, None, (0, 0, 0), (1, 1, 1), (1, 1, 1), 1), 5))
        x = torch.randn(64 * 2 ** 20, device=device)
        y = torch.empty_like(x)
        copy = 2 * x.numel() * 4 / med(lambda: y.copy_(x), 5)
        one = torch.zeros(1, device=device)

        def ops():
            for _ in range(100):
                one.add(1.0)

        op = med(ops, 21) / 100
    return {"tf32_tensor_tflops": gemm / 1e12, "fp32_tflops": gemm / 1e12, "hbm_tbs": copy / 1e12, "op_us": op * 1e6,
            "source": f"measured on this {device.type} device: float32 2048 x 2048 product, 256 MiB copy, one tiny operator"}


def classify(t: float, t_compute: float, t_memory: float, t_latency: float | None = None) -> str:
    """What bounds a stage of measured time ``t`` per scene: "compute" or "memory bandwidth" (the
    larger floor) where ``t`` is within :data:`LATENCY_FACTOR` of it; else "launch/latency" (on
    the CPU: the host's Python and operator dispatch), or, where the one-scene latency floor
    ``t_latency`` is known and explains less than half of ``t``, "kernel efficiency" (large
    kernels that run below both roofs)."""
    floor = max(t_compute, t_memory)
    if t <= LATENCY_FACTOR * floor:
        return "compute" if t_compute >= t_memory else "memory bandwidth"
    if t_latency is not None and t_latency < 0.5 * t:
        return "kernel efficiency"
    return "launch/latency"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--checkpoint", default=None, help="a checkpoint file or a packaged model's name, e.g. default (default: the packaged model)")
    ap.add_argument("--config", default=None, help="a training TOML: an untrained network of it instead of a checkpoint")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides of --config (scenario.*, model.*)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-latency", action="store_true", help="skip the one-scene timings")
    ap.add_argument("--peaks", default="auto", choices=["auto", "measured", *PEAKS],
                    help="the peaks to compare with (auto: the CUDA device's datasheet; measured on the CPU)")
    ap.add_argument("--out", default=None, help="write the JSON record here (atomically)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    p = build_pipeline(args, device)
    B = args.batch
    scenes = risloc.simulate(p.scenario, B, seed=args.seed, device=device)
    calls_fn, calls, n_first_scan = stage_calls(p, scenes, capture=True)
    counts = analytic(p, B, calls, n_first_scan, device)
    one = stage_calls(p, scenes[:1], capture=True)[0] if not args.no_latency else {}
    peak_name, peak = peaks_for(device, args.peaks)

    # the network's FLOPs by FlopCounterMode (the cross-check of the analytic count). It does not see
    # oneDNN's convolution (the CPU route of a few scenes, spectrum._Conv3d): PyTorch's own kernel
    # choice (the same convolutions) runs for this pass
    fcm = FlopCounterMode(display=False)
    min_cells, spectrum._Conv3d.MIN_CELLS = spectrum._Conv3d.MIN_CELLS, 10**12
    try:
        with torch.no_grad(), fcm:
            calls_fn["network"]()
    finally:
        spectrum._Conv3d.MIN_CELLS = min_cells
    flop_counter_network = fcm.get_total_flops() / B

    per_call_scenes = {"likelihood_eval": 1, "dictionary": 1, "scan": 1}
    stages = {}
    for name, fn in calls_fn.items():
        oc = count_ops(fn)
        t = median_time(fn, device, args.repeats, args.warmup)
        t1 = median_time(one[name], device, args.repeats, args.warmup) if name in one else None
        c = counts.get(name)
        rec = {
            "what": "per scene, one call of the piece" if name in per_call_scenes else "per scene",
            "analytic": None if c is None else {"flops": c.flops, "flops_products": c.products, "flops_other": c.other,
                                                "useful_flops": c.useful, "bytes": c.bytes,
                                                "intensity_flop_per_byte": c.flops / c.bytes},
            "counted": {"matmul_flops": oc.matmul_flops / B, "conv_flops": oc.conv_flops / B, "bytes_eager": oc.bytes / B,
                        "ops_per_call": oc.ops, "linalg_calls_per_call": dict(oc.linalg), "host_reads_per_call": oc.host_reads,
                        "host_syncs_per_call": host_syncs(fn, device)},
            "time_s_per_call": t, "us_per_scene": t / B * 1e6, "scenes_per_s": B / t,
            "latency_floor_us_per_scene": None if t1 is None else t1 / B * 1e6,
        }
        if name == "network":
            rec["counted"]["flop_counter_mode"] = flop_counter_network
        if c is not None:
            rec["achieved_tflops"] = c.flops * B / t / 1e12
            rec["achieved_gbs"] = c.bytes * B / t / 1e9
            rec["achieved_gbs_eager"] = oc.bytes / t / 1e9
            if peak is not None:
                tc = c.products / (peak["tf32_tensor_tflops"] * 1e12) + c.other / (peak["fp32_tflops"] * 1e12)
                tm = oc.bytes / B / (peak["hbm_tbs"] * 1e12)
                rec["t_compute_us_per_scene"] = tc * 1e6
                rec["t_memory_us_per_scene"] = tm * 1e6
                rec["t_memory_analytic_us_per_scene"] = c.bytes / (peak["hbm_tbs"] * 1e12) * 1e6
                rec["fraction_of_tf32_peak"] = c.products * B / t / (peak["tf32_tensor_tflops"] * 1e12)
                rec["fraction_of_hbm"] = oc.bytes / t / (peak["hbm_tbs"] * 1e12)
                td = oc.ops * peak["op_us"] / 1e6 / B if "op_us" in peak else None
                if td is not None:
                    rec["t_dispatch_us_per_scene"] = td * 1e6
                rec["bound"] = classify(t / B, tc, tm, None if t1 is None else t1 / B)
        stages[name] = rec
    stages["likelihood_stage"]["calls"] = dict(calls)

    sc = p.scenario
    out = {"commit": git_commit(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "batch": B, "seed": args.seed,
           "checkpoint": None if args.config else (args.checkpoint or f"packaged {inf.DEFAULT_WEIGHTS.name}"), "config": args.config, "set": args.set,
           "shapes": {"L": sc.snapshots, "M": sc.m_bs, "N": sc.n_elements, "K_max": sc.k_max,
                      "Q_front_end": int(math.prod(p.model.shape)),
                      "Q_dictionary": int(math.prod(p.stage_options["grid_shape"])), "pursuit": p.model.cfg.pursuit,
                      "dictionary_reused": inf.reuses_dictionary(p.stage_options, p.model),
                      "split_tf32": device.type == "cuda"},
           "peaks": None if peak is None else {"name": peak_name, **peak}, "latency_factor": LATENCY_FACTOR,
           "repeats": args.repeats, "warmup": args.warmup, "stages": stages}
    if peak is not None:
        print(f"peaks ({peak_name}): products {peak['tf32_tensor_tflops']:.3f} TFLOP/s, other {peak['fp32_tflops']:.3f} TFLOP/s, "
              f"memory {peak['hbm_tbs']:.3f} TB/s" + (f", {peak['op_us']:.2f} us per dispatched operator" if "op_us" in peak else ""))
    print(f"{'stage':<18}{'GFLOP/scene':>12}{'MB/scene':>10}{'MB eager':>10}{'us/scene':>13}{'scenes/s':>11}{'TFLOP/s':>9}{'GB/s eager':>11}"
          f"{'floors c/m/d, us':>26}  bound")
    for name, r in stages.items():
        a = r["analytic"]
        floors = "/".join(f"{r[k]:.1f}" if k in r else "-" for k in ("t_compute_us_per_scene", "t_memory_us_per_scene", "t_dispatch_us_per_scene"))
        print(f"{name:<18}{(a['flops'] / 1e9 if a else float('nan')):>12.3f}{(a['bytes'] / 1e6 if a else float('nan')):>10.2f}"
              f"{r['counted']['bytes_eager'] / 1e6:>10.2f}{r['us_per_scene']:>13.2f}{r['scenes_per_s']:>11.1f}"
              f"{r.get('achieved_tflops', float('nan')):>9.2f}{r.get('achieved_gbs_eager', float('nan')):>11.1f}{floors:>26}  {r.get('bound', '-')}")
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
