"""The near-field grid of risloc: one grid, uniform in (sin phi, sin theta, 1/r), for the
spectrum searches (MUSIC, MVDR, the RIS method), the ``ml`` dictionary and the networks.

Axes (:func:`grid_axes`), over the scenario's field of view and range interval::

    phi_i   = asin(sin phi_min + i (sin phi_max - sin phi_min) / (n_phi - 1)),     i = 0..n_phi-1
    theta_j = asin(sin theta_min + j (sin theta_max - sin theta_min) / (n_theta - 1))
    rho_m   = 1/r_max + m (1/r_min - 1/r_max) / (n_r - 1),   r_m = 1 / rho_m

(``spacing="angle"`` makes the two angle axes uniform in angle instead; an axis of one point
sits at the middle of its interval). The sampling follows the resolution of the aperture:
the beamwidth is nearly uniform in sin(angle) and the near-field range resolution nearly
uniform in 1/r, since the Fresnel phase term is (|e|^2 - (u.e)^2) / (2 r). Points are
flattened with phi slowest and rho fastest (index ``(i n_theta + j) n_r + m``).

On that grid:

* :func:`search_grid`: the unit-norm steering matrix ``[G, N]`` of the subspace searches
  (:mod:`risloc.estimators.search`), with the steps and the prior box;
* :func:`dictionary`: the steering *dictionary* ``D = [a(phi_q, theta_q, r_q)]`` ``[N, Q]`` of
  ``ml`` and of the spectrum network;
* :func:`measure_dictionary`: the dictionary seen through every snapshot's own map,
  ``Phi_l = G_l D`` with ``G_l = H diag(c_l)`` (``[B, L, M, Q]``, ~10 MB per scene for
  ``ml``'s default grid);
* the same products without storing Phi: :func:`back_project` (G_l^H v, so that every inner
  product with an atom is one product with D: phi_lq^H v = d_q^H G_l^H v) and
  :func:`atom_norms` (|phi_lq|^2, the one quantity that needs every entry of Phi, computed
  in chunks of scenes; on CUDA as one split-TF32 real product, float32-accurate);
* :class:`MeasuredDictionary`: |phi_lq|^2 and y_l^H phi_lq of a batch of scenes on one grid,
  measured once (by the spectrum network's front end) and read again by ``learned``'s
  likelihood stage, which then measures no dictionary of its own.

Built grids are cached per (scenario, shape, device, dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import physics
from .cuda_graphs import cache_entry, register_cache
from .scenario import Scenario

__all__ = ["GridSpec", "SearchGrid", "Dictionary", "grid_axes", "grid_points", "search_grid", "dictionary", "measure_dictionary", "dictionary_product",
           "back_project", "atom_norms"]


@dataclass(frozen=True)
class GridSpec:
    """Size and sampling of a near-field grid."""

    n_phi: int = 49
    """Azimuth samples over [phi_min, phi_max]."""
    n_theta: int = 25
    """Elevation samples over [theta_min, theta_max]."""
    n_r: int = 20
    """Range samples, uniform in 1/r over [1/r_max, 1/r_min]."""
    spacing: str = "sin"
    """'sin': angles uniform in sin(angle); 'angle': uniform in angle."""
    approximation: str = "exact"
    """Steering model on the grid: 'exact' (physics.md) or 'fresnel'."""

    def __post_init__(self):
        for name in ("n_phi", "n_theta", "n_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"GridSpec.{name} = {getattr(self, name)}: must be >= 1")
        if self.spacing not in ("sin", "angle"):
            raise ValueError(f"GridSpec.spacing = {self.spacing!r}: must be 'sin' or 'angle'")
        if self.approximation not in ("exact", "fresnel"):
            raise ValueError(f"GridSpec.approximation = {self.approximation!r}: must be 'exact' or 'fresnel'")

    @property
    def size(self) -> int:
        return self.n_phi * self.n_theta * self.n_r

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_phi, self.n_theta, self.n_r)


def _axis(lo: float, hi: float, n: int, spacing: str) -> Tensor:
    if n == 1:
        return torch.tensor([0.5 * (lo + hi)], dtype=torch.float64)
    if spacing == "sin":
        return torch.asin(torch.linspace(math.sin(lo), math.sin(hi), n, dtype=torch.float64))
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def grid_axes(scenario: Scenario, spec: GridSpec = GridSpec()) -> tuple[Tensor, Tensor, Tensor]:
    """The three axes (phi [rad], theta [rad], rho = 1/r [1/m]) of the module docstring, float64 on CPU."""
    sc = scenario
    if not (0 < sc.r_min <= sc.r_max):
        raise ValueError(f"scenario.r_min = {sc.r_min}: a near-field grid needs 0 < r_min <= r_max")
    phi = _axis(sc.phi_min, sc.phi_max, spec.n_phi, spec.spacing)
    theta = _axis(sc.theta_min, sc.theta_max, spec.n_theta, spec.spacing)
    rho_lo, rho_hi = 1.0 / sc.r_max, 1.0 / sc.r_min
    rho = torch.linspace(rho_lo, rho_hi, spec.n_r, dtype=torch.float64) if spec.n_r > 1 else torch.tensor([0.5 * (rho_lo + rho_hi)], dtype=torch.float64)
    return phi, theta, rho


def grid_points(scenario: Scenario, spec: GridSpec = GridSpec()) -> tuple[Tensor, Tensor, Tensor]:
    """Flat grid points (phi, theta, rho), each ``[Q]`` float64, phi slowest and rho fastest."""
    P, T, R = torch.meshgrid(*grid_axes(scenario, spec), indexing="ij")
    return P.reshape(-1), T.reshape(-1), R.reshape(-1)


_CACHE: dict = register_cache({})  # graphs keep what they read from it (risloc.cuda_graphs)


def _cached(key, build):
    return cache_entry(_CACHE, key, build)


@dataclass
class SearchGrid:
    """A built search grid: axes, unit-norm steering ``[G, N]`` (phi slowest, r fastest), steps."""

    phi: Tensor
    theta: Tensor
    rho: Tensor
    steering: Tensor
    step: tuple[float, float, float]
    """Typical step (phi [rad], theta [rad], rho [1/m]) at broadside, the refinement's scale."""
    bounds: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    """Prior box ((phi_min, phi_max), (theta_min, theta_max), (rho_min, rho_max))."""
    spec: GridSpec

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.phi.numel(), self.theta.numel(), self.rho.numel())


def search_grid(scenario: Scenario, spec: GridSpec = GridSpec(), *, device=None, dtype: torch.dtype = torch.complex64) -> SearchGrid:
    """The search grid of ``scenario``: unit-norm steering vectors ``a / |a|`` (computed in
    complex128, stored in ``dtype``), cached per scenario, spec, device and dtype."""
    device = torch.device(device) if device is not None else torch.device("cpu")

    def build() -> SearchGrid:
        sc = scenario
        phi, theta, rho = grid_axes(sc, spec)
        P, T, Rh = grid_points(sc, spec)
        a = physics.steering(P, T, 1.0 / Rh, sc, approximation=spec.approximation, dtype=torch.complex128)
        a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
        rho_lo, rho_hi = 1.0 / sc.r_max, 1.0 / sc.r_min

        def step(ax: Tensor, lo: float, hi: float) -> float:
            if ax.numel() > 1:
                return float((ax[1:] - ax[:-1]).min())
            return max(hi - lo, 1e-3)

        rd = physics.real_dtype(dtype)
        return SearchGrid(
            phi=phi.to(device, rd), theta=theta.to(device, rd), rho=rho.to(device, rd),
            steering=a.to(device=device, dtype=dtype).contiguous(),
            step=(step(phi, sc.phi_min, sc.phi_max), step(theta, sc.theta_min, sc.theta_max), step(rho, rho_lo, rho_hi)),
            bounds=((sc.phi_min, sc.phi_max), (sc.theta_min, sc.theta_max), (rho_lo, rho_hi)),
            spec=spec,
        )

    return _cached(("search", scenario.to_json(), spec, str(device), dtype), build)


@dataclass
class Dictionary:
    """A steering dictionary on the grid: points ``phi, theta, rho`` ``[Q]`` (real dtype of ``D``)
    and ``D = [a(phi_q, theta_q, 1/rho_q)]`` ``[N, Q]`` (exact steering, not normalised)."""

    phi: Tensor
    theta: Tensor
    rho: Tensor
    D: Tensor
    shape: tuple[int, int, int]


def abs2(z: Tensor) -> Tensor:
    """|z|^2 elementwise for a complex tensor, as Re(z conj(z)): one complex product (on a CPU
    several times faster than |z| squared, whose modulus goes through hypot), the same values to
    float rounding. A real view of the product (stride 2). On the CPU the vectorised product rounds
    by position in the vector, so the result of an element can depend on the batch around it."""
    return (z * z.conj()).real


def sum_abs2(z: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """|z|^2 of a complex tensor, summed over ``dim`` (None: elementwise). On CUDA one vector norm
    (one kernel), or |z| squared. On the CPU PyTorch takes each complex modulus through hypot, and
    its complex norm over a strided axis ran about 100 x slower (a one-scene scan's [1, 16, 5, 3 456]
    products: 12 ms against 0.14 ms on a 2-core AMD EPYC); there Re(z)^2 + Im(z)^2 elementwise, then
    the slices along ``dim`` added one by one (for the short axes it is used on): elementwise
    operations round every element alike, so a scene's result does not depend on the batch around
    it, which a vectorised reduction does not promise.

    ``dim`` a tuple of trailing axes (a Frobenius norm per matrix, e.g. the likelihood's
    tr C^-2 = |C^-1|_F^2): on the CPU the vector norm of the real view over those axes and (Re, Im),
    one reduction per output over its own contiguous elements (the same at any batch size, tested;
    70 against 4 us for one scene's [1, 16, 16, 16] C^-1)."""
    if z.device.type == "cuda":
        return z.abs().square() if dim is None else torch.linalg.vector_norm(z, dim=dim).square()
    if isinstance(dim, tuple):
        axes = sorted(d % z.ndim for d in dim)
        if axes != list(range(z.ndim - len(dim), z.ndim)):
            raise ValueError(f"sum_abs2: a tuple dim must name the trailing axes, got {dim} for shape {tuple(z.shape)}")
        return torch.linalg.vector_norm(torch.view_as_real(z), dim=(*axes, z.ndim)).square()
    a = z.real.square() + z.imag.square()
    if dim is None:
        return a
    out = a.select(dim, 0).clone()
    for i in range(1, a.shape[dim]):
        out += a.select(dim, i)
    return out


@dataclass
class MeasuredDictionary:
    """The dictionary of the grid ``shape`` (:func:`dictionary`) measured through a batch of
    scenes, as the scenes were given (no scaling): per scene, snapshot l and atom q,

        norms[b, l, q] = |phi_lq|^2,   y_products[b, l, q] = y_l^H phi_lq,   phi_lq = G_l d_q,

    ``[B, L, Q]`` each (float32 and complex64). Made by the spectrum network's front end
    (:func:`risloc.nn.networks.spectrum.matched_filter_spectra`, ``keep_dictionary=True``, its
    first two products) and read by ``ml``'s ``init`` path (:func:`risloc.estimators.ml.estimate`,
    ``dictionary=``), whose growth and RELAX searches then measure no dictionary of their own."""

    shape: tuple[int, int, int]
    norms: Tensor
    y_products: Tensor


def dictionary(scenario: Scenario, shape: tuple[int, int, int], *, device=None, dtype: torch.dtype = torch.complex64) -> Dictionary:
    """The exact-steering dictionary on the ``shape = (n_phi, n_theta, n_r)`` grid (sin spacing),
    computed in ``dtype`` from the points rounded to its real dtype; cached per scenario, shape,
    device and dtype."""
    shape = tuple(int(s) for s in shape)
    spec = GridSpec(*shape)

    def build() -> Dictionary:
        rd = physics.real_dtype(dtype)
        gp, gt, gr = (t.to(device=device, dtype=rd) for t in grid_points(scenario, spec))
        D = physics.steering(gp, gt, 1.0 / gr, scenario, dtype=dtype, device=device).T.contiguous()  # [N, Q]
        return Dictionary(gp, gt, gr, D, shape)

    return _cached(("dictionary", scenario.to_json(), shape, str(device), dtype), build)


def maps(H: Tensor, codes: Tensor) -> Tensor:
    """The stacked maps G_l = H diag(c_l) of every snapshot: H ``[B, M, N]``, codes ``[B, L, N]`` ->
    ``[B, L M, N]`` (rows of G_1, then of G_2, ...)."""
    B, L, N = codes.shape
    return (H.unsqueeze(1) * codes.unsqueeze(2)).reshape(B, L * H.shape[1], N)


def measure_dictionary(H: Tensor, codes: Tensor, D: Tensor) -> Tensor:
    """Per-scene dictionary ``Phi_l = G_l D``, ``G_l = H diag(c_l)``: H ``[B, M, N]``, codes ``[B, L, N]``,
    D ``[N, Q]`` -> ``[B, L, M, Q]`` (one product of the stacked rows of every G_l, :func:`maps`, with D)."""
    B, L, N = codes.shape
    return (maps(H, codes).reshape(-1, N) @ D).view(B, L, H.shape[1], -1)


def back_project(v: Tensor, H: Tensor, codes: Tensor) -> Tensor:
    """G_l^H v = conj(c_l) * (H^H v) for measurement-space vectors ``v`` ``[B, L, M]`` (one per
    snapshot) or ``[B, L, J, M]`` (J per snapshot) -> ``[B, L, N]`` or ``[B, L, J, N]``;
    H ``[B, M, N]``, codes ``[B, L, N]``.

    With w = G_l^H v every inner product with a measured atom phi_lq = G_l d_q is a product
    with the dictionary instead of with Phi_l:

        v^H phi_lq = w^H d_q = sum_n conj(w_n) D_nq,    i.e.  v^H Phi_l = conj(w)^T D,

    one ``[.., N] x [N, Q]`` product (``back_project(v, H, codes).conj() @ D``) for all atoms.
    """
    if v.ndim == 3:
        return codes.conj() * torch.einsum("bmn,blm->bln", H.conj(), v)
    return codes.conj().unsqueeze(2) * torch.einsum("bmn,bljm->bljn", H.conj(), v)


def _tf32_split(x: Tensor) -> tuple[Tensor, Tensor]:
    """x = hi + lo (float32) with ``hi`` exactly representable in TF32 (10 mantissa bits: the low 13
    bits cleared) and ``lo`` the remainder, itself carried by TF32 to ~2^-11 of its size."""
    hi = (x.contiguous().view(torch.int32) & -8192).view(torch.float32)
    return hi, x - hi


_SPLIT_CACHE: dict = register_cache({})  # graphs keep what they read from it (risloc.cuda_graphs)


def _dictionary_key(D: Tensor) -> tuple:
    """The cache key of a dictionary tensor: its storage, shape, strides, device, dtype and version."""
    return (D.data_ptr(), tuple(D.shape), D.stride(), str(D.device), D.dtype, 0 if D.is_inference() else D._version)


def _real_block(D: Tensor) -> Tensor:
    """Dr = [[Re D, Im D], [-Im D, Re D]] ``[2N, 2Q]`` float32: the complex product G D is the real
    product [Re G, Im G] Dr = [Re(G D), Im(G D)]."""
    return torch.cat([torch.cat([D.real, D.imag], 1), torch.cat([-D.imag, D.real], 1)], 0).to(torch.float32)


def _split_real_dictionary(D: Tensor, interleaved: bool = False) -> Tensor:
    """``[[Dr_hi], [Dr_lo], [Dr_hi]]`` ``[6N, 2Q]`` float32 with Dr = :func:`_real_block` (D)
    and (Dr_hi, Dr_lo) = :func:`_tf32_split` (Dr). ``interleaved``: the rows and columns of Dr in
    the order (Re, Im) per element and per atom instead, so that the real product of
    ``view_as_real(G)`` is ``view_as_real(G D)`` (:func:`dictionary_product`). Cached per tensor
    ``D`` (its storage, shape, strides, device, dtype and version; the cache holds ``D`` so its
    storage is not reused)."""
    key = (*_dictionary_key(D), interleaved)

    def build():
        if interleaved:  # Dr[(n, i), (q, o)]: input part i (Re, Im) of element n to output part o of atom q
            re, im = D.real.to(torch.float32), D.imag.to(torch.float32)
            Dr = torch.stack([torch.stack([re, im], -1), torch.stack([-im, re], -1)], 1).reshape(2 * D.shape[0], 2 * D.shape[1])
        else:
            Dr = _real_block(D)
        hi, lo = _tf32_split(Dr)
        return D, torch.cat([hi, lo, hi], 0).contiguous()

    return cache_entry(_SPLIT_CACHE, key, build, limit=8)[1]


def _onednn_dictionary(D: Tensor) -> Tensor:
    """Dr^T (:func:`_real_block`) as the weight ``[2Q, 2N, 1, 1, 1]`` of a 1 x 1 x 1 oneDNN
    convolution, cached per tensor ``D`` as :func:`_split_real_dictionary`."""

    def build():
        N, Q = D.shape
        return D, _real_block(D).T.contiguous().view(2 * Q, 2 * N, 1, 1, 1)

    return cache_entry(_SPLIT_CACHE, (*_dictionary_key(D), "onednn"), build, limit=8)[1]


def _split_tf32_matmul(x: Tensor, Ds: Tensor) -> Tensor:
    """x ``[R, 2N]`` float32 times the split dictionary ``Ds`` ``[6N, 2Q]`` of
    :func:`_split_real_dictionary`: x_hi (Dr_hi + Dr_lo) + x_lo Dr_hi as ONE TF32 product."""
    hi, lo = _tf32_split(x)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return torch.cat([hi, hi, lo], 1) @ Ds
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def dictionary_product(w: Tensor, D: Tensor, *, tensor_cores: bool | None = None) -> Tensor:
    """w @ D for complex rows ``w`` ``[..., N]`` and the dictionary ``D`` ``[N, Q]`` -> ``[..., Q]``:
    the inner products of vectors with every atom (:func:`back_project`).

    ``tensor_cores`` (default on CUDA for complex64): the product as one real split-TF32 product
    on the tensor cores (the "3xTF32" scheme of :func:`atom_norms`, as accurate as float32), its
    operands in (Re, Im) pairs so that input and output are views of the complex tensors.
    Otherwise the complex matmul."""
    if tensor_cores is None:
        tensor_cores = w.device.type == "cuda" and w.dtype == D.dtype == torch.complex64
    if not tensor_cores:
        return w @ D
    if w.dtype != torch.complex64 or D.dtype != torch.complex64:
        raise ValueError(f"dictionary_product: tensor_cores needs complex64 operands, not {w.dtype} and {D.dtype}")
    N, Q = D.shape
    x = torch.view_as_real(w.reshape(-1, N).resolve_conj().contiguous()).reshape(-1, 2 * N)  # (Re, Im) per element
    out = _split_tf32_matmul(x, _split_real_dictionary(D, interleaved=True))  # (Re, Im) per atom, [R, 2Q]
    return torch.view_as_complex(out.view(-1, Q, 2)).view(*w.shape[:-1], Q)


CPU_CHUNK = 2
"""Scenes per product of :func:`atom_norms` on the CPU: Phi of two scenes (14 MB in float32 on
3 456 atoms) stays in the caches of a small CPU. On a 2-core AMD EPYC VM, per scene of 16 on the
spectrum network's grid: 3.5 ms in chunks of 1 or 2, 6.2 in chunks of 4, 9.3 in chunks of 16
(oneDNN; the complex matmul 6.1, 6.8 and 9.4 ms)."""


def atom_norms(H: Tensor, codes: Tensor, D: Tensor, *, tensor_cores: bool | None = None, onednn: bool | None = None,
               chunk: int | None = None) -> Tensor:
    """|phi_lq|^2 = |G_l d_q|^2 = sum_m |(H diag(c_l) D)_mq|^2 ``[B, L, Q]`` (real dtype of ``D``):
    H ``[B, M, N]``, codes ``[B, L, N]``, D ``[N, Q]`` on one device and in D's dtype.

    The one quantity on the dictionary that needs every entry of Phi_l = G_l D (L M N Q complex
    multiply-adds per scene); Phi is never stored for more than ``chunk`` scenes at a time. Three
    routes to the same product, ``chunk`` scenes at a time:

    * ``tensor_cores=True`` (complex64 only; default on CUDA for complex64): the real product
      [Re G, Im G] [[Re D, Im D], [-Im D, Re D]] = [Re Phi, Im Phi] as ONE TF32 product with split
      operands, G_hi (D_hi + D_lo) + G_lo D_hi (:func:`_tf32_split`; the "3xTF32" scheme), accurate
      to ~1e-6 relative like float32 (``chunk`` default 256 scenes). That accuracy matters: the
      callers subtract projections |e^H phi|^2 from these norms, and atoms next to a chosen one
      keep only a small fraction of their norm.
    * ``onednn=True`` (complex64 on the CPU; its default there, where oneDNN is built in and no
      input needs a gradient): the same real product in float32 as a 1 x 1 x 1 oneDNN convolution
      (``torch.mkldnn_convolution``). On a 2-core AMD EPYC VM oneDNN runs it at about 450 GFLOP/s
      where the complex matmul (MKL) reaches about 210: 3.4 against 6.1 ms for one scene on the
      spectrum network's 3 456 atoms, with the same rounding.
    * otherwise the complex product :func:`measure_dictionary` (``chunk`` default 16 scenes on a GPU).

    On the CPU ``chunk`` defaults to :data:`CPU_CHUNK` scenes.
    """
    B, L, N = codes.shape
    M = H.shape[1]
    if tensor_cores is None:
        tensor_cores = H.device.type == "cuda" and D.dtype == torch.complex64
    if tensor_cores and D.dtype != torch.complex64:
        raise ValueError(f"atom_norms: tensor_cores needs a complex64 dictionary, not {D.dtype}")
    if onednn is None:
        onednn = (not tensor_cores and D.device.type == "cpu" and D.dtype == torch.complex64 and torch.backends.mkldnn.is_available()
                  and not (H.requires_grad or codes.requires_grad or D.requires_grad))
    if onednn and (tensor_cores or D.device.type != "cpu" or D.dtype != torch.complex64):
        raise ValueError(f"atom_norms: onednn needs a complex64 dictionary on the CPU and no tensor_cores, not {D.dtype} on {D.device}")
    Q = D.shape[1]
    out = [torch.zeros(0, L, Q, dtype=D.real.dtype, device=D.device)]
    if onednn:
        W = _onednn_dictionary(D)
        step = chunk or CPU_CHUNK
        for a in range(0, B, step):
            Hb, cb = H[a : a + step].to(D.dtype), codes[a : a + step].to(D.dtype)
            b = Hb.shape[0]
            Gt = Hb.permute(2, 0, 1).unsqueeze(2) * cb.permute(2, 0, 1).unsqueeze(3)  # G_l's entries, [N, b, L, M]
            x = torch.cat([Gt.real, Gt.imag]).view(1, 2 * N, b * L * M, 1, 1)  # the rows of [Re G, Im G] as pixels
            P = torch.mkldnn_convolution(x, W, None, (0, 0, 0), (1, 1, 1), (1, 1, 1), 1).view(2 * Q, b, L, M)  # [Re Phi; Im Phi]
            n = P.square().sum(-1)  # [2Q, b, L]
            out.append((n[:Q] + n[Q:]).permute(1, 2, 0))
        return torch.cat(out)
    if not tensor_cores:
        step = chunk or (CPU_CHUNK if D.device.type == "cpu" else 16)
        for a in range(0, B, step):
            Phi = measure_dictionary(H[a : a + step], codes[a : a + step], D)
            out.append(Phi.real.square().sum(2) + Phi.imag.square().sum(2))
        return torch.cat(out)
    Ds = _split_real_dictionary(D)
    step = chunk or 256
    for a in range(0, B, step):
        Hb, cb = H[a : a + step], codes[a : a + step]
        b = Hb.shape[0]
        G = (Hb.unsqueeze(1) * cb.unsqueeze(2)).reshape(b * L * M, N)
        P = _split_tf32_matmul(torch.cat([G.real, G.imag], 1), Ds).view(b, L, M, -1)  # [Re Phi, Im Phi]
        n = torch.linalg.vector_norm(P, dim=2).square()  # [b, L, 2Q], one pass over P
        out.append(n[..., :Q] + n[..., Q:])
    return torch.cat(out)
