"""The kinks of a ReLU / max-pool network, as its forward pass meets them.

    python -c "import torch; from diralign.kinks import KinkMode; net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.ReLU()); m = KinkMode(); m.run(lambda: net(torch.randn(5, 3))); print([s.kind for s in m.sites])"

A bias-free ReLU / max-pool network is a polynomial in ``W`` on each example between changes
of its *activation pattern*: the signs of every ReLU input ``z`` and the argmax of every
max-pool window.  Each example therefore carries *kink functions* ``h(W)`` whose zero sets are
the switching surfaces: ``h = z`` at a ReLU input, ``h = x_a - x_b`` for the two largest
entries ``a, b`` of a pool window.

:class:`KinkMode` is a ``TorchFunctionMode``: it intercepts ``relu`` (``torch.relu``,
``F.relu``, ``Tensor.relu``, ``nn.ReLU``) and ``max_pool2d`` (``F.max_pool2d``,
``nn.MaxPool2d``) in *any* model, numbers the call sites in call order, records their
inputs (the watch-list for pattern changes) and, for a *sliding set* of kinks held on their
surfaces, fixes the one-sided derivative there (ReLU: ``relu'(0) := 0``; pool: the whole
derivative to entry ``a``) and exposes ``h`` of those kinks as differentiable tensors.  Fixing
the side matters: on a surface the autodiff side is decided by rounding (``z ~ 1e-17``), and
a side that flips between two evaluations would make the sliding multipliers jump.
Other kinked operations (leaky ReLU, abs, clamp, max over tensors) are not handled; a model
using them is refused by the kinked flow (see :func:`diralign.models.structure.nonsmooth_operations`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

RELU_NAMES = {"relu", "relu_"}
POOL_NAMES = {"max_pool2d"}


@dataclass
class Site:
    """One kinked call of a forward pass (``index`` = its position in call order)."""

    index: int
    kind: str  # "relu" | "pool"
    z: torch.Tensor  # the call's input (detached): ReLU inputs, or pool inputs
    argmax: Optional[torch.Tensor] = None  # pool: flat index into z of each window's max (shape of the output)
    out: Optional[torch.Tensor] = None  # the call's output, in the graph (its gradient: the backward signal)
    signal: Optional[torch.Tensor] = None  # filled in by the caller: d(log L)/d(out), detached
    scale: Optional[torch.Tensor] = None  # filled in by the caller: estimated ||grad z|| per entry of z


@dataclass
class KinkSet:
    """A set of kinks, as flat tensors of equal length ``m`` (the order of the multipliers).

    ``site``: call-site index; ``a``: flat index into the site's input (ReLU: the unit; pool:
    the entry held as the window's winner); ``b``: pool runner-up (``-1`` for ReLU); ``o``:
    pool output (window) flat index (``-1`` for ReLU).  ``h = z[a]`` or ``z[a] - z[b]``.
    """

    site: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    a: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    b: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    o: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.site.numel())

    @property
    def is_pool(self) -> torch.Tensor:
        return self.b >= 0

    def keys(self) -> list[tuple[int, int, int]]:
        return list(zip(self.site.tolist(), self.a.tolist(), self.b.tolist()))

    def positions(self, site: int) -> torch.Tensor:
        return (self.site == site).nonzero().flatten()

    def subset(self, keep: torch.Tensor) -> KinkSet:
        return KinkSet(self.site[keep], self.a[keep], self.b[keep], self.o[keep])

    def union(self, other: KinkSet) -> KinkSet:
        """Concatenated, duplicates (same site and unit / window) dropped, sorted by site."""
        site = torch.cat([self.site, other.site])
        a = torch.cat([self.a, other.a])
        b = torch.cat([self.b, other.b])
        o = torch.cat([self.o, other.o])
        # A ReLU kink is its unit; a pool kink its window and runner-up: a window tied among
        # three entries or more holds one kink per runner-up, all with the same winner ``a``.
        key = torch.where(b >= 0, o, a)
        seen, keep = set(), []
        for i, k in enumerate(zip(site.tolist(), (b >= 0).tolist(), key.tolist(), b.tolist())):
            if k not in seen:
                seen.add(k)
                keep.append(i)
        keep_t = torch.tensor(keep, dtype=torch.long)
        out = KinkSet(site[keep_t], a[keep_t], b[keep_t], o[keep_t])
        order = torch.argsort(out.site * (1 << 40) + torch.where(out.b >= 0, out.o, out.a), stable=True)
        return out.subset(order)

    def state(self) -> dict:
        return {"site": self.site.clone(), "a": self.a.clone(), "b": self.b.clone(), "o": self.o.clone()}

    @classmethod
    def from_state(cls, state: dict) -> KinkSet:
        return cls(state["site"].long(), state["a"].long(), state["b"].long(), state["o"].long())


class KinkMode(TorchFunctionMode):
    """Record kinked call sites; hold the kinks of ``sliding`` on their surfaces.

    After a forward under the mode, ``sites`` lists the calls, ``h`` is the vector of the
    sliding kinks' values (differentiable, in the order of ``sliding``) and ``outputs`` the
    site outputs whose gradient is each sliding kink's backward signal ``delta`` (the
    derivative of the loss with respect to the unit's output, or the window's).
    """

    def __init__(self, sliding: Optional[KinkSet] = None, record: bool = True, pattern: Optional[dict] = None):
        super().__init__()
        self.sliding = sliding if sliding is not None and len(sliding) else None
        self.record = record
        # A frozen activation pattern (site index -> ReLU mask or pool argmax, see
        # :func:`pattern_of`): the forward then computes the smooth piece of that pattern,
        # continued past its switching surfaces.  An integrator of smooth pieces needs this:
        # its trial points straddle a surface the solution is about to meet, and the true
        # (kinked) field there would make its Newton iterations fail step after step.
        self.pattern = pattern
        self.sites: list[Site] = []
        self.h_parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions in sliding, h values)
        self.signal_parts: list[
            tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ] = []  # (positions, output tensor, flat idx)
        self._count = 0

    def run(self, fn: Callable):
        with self:
            return fn()

    # -- the vector h of the sliding kinks, in the order of ``sliding`` -------------------
    @property
    def h(self) -> Optional[torch.Tensor]:
        if self.sliding is None:
            return None
        parts = [v for _, v in self.h_parts]
        if not parts:
            raise RuntimeError("sliding kinks name call sites this forward pass did not make")
        values = torch.cat(parts)
        pos = torch.cat([p for p, _ in self.h_parts])
        if pos.numel() != len(self.sliding):
            raise RuntimeError("sliding kinks name call sites this forward pass did not make")
        return values[torch.argsort(pos)]

    def signals(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """``delta`` of each sliding kink from the gradients of :attr:`signal_tensors`."""
        out = torch.zeros(len(self.sliding), dtype=grads[0].dtype if grads else torch.float64)
        for (pos, _, idx), g in zip(self.signal_parts, grads):
            out[pos] = g.reshape(-1)[idx].to(out.dtype)
        return out

    @property
    def signal_tensors(self) -> list[torch.Tensor]:
        return [t for _, t, _ in self.signal_parts]

    # -- interception ---------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in RELU_NAMES and args and isinstance(args[0], torch.Tensor):
            return self._relu(args[0])
        if name in POOL_NAMES and args and isinstance(args[0], torch.Tensor):
            return self._pool(func, args, kwargs)
        return func(*args, **kwargs)

    def _next(self) -> int:
        k = self._count
        self._count += 1
        return k

    def _sliding_here(self, k: int):
        if self.sliding is None:
            return None
        pos = self.sliding.positions(k)
        return pos if pos.numel() else None

    def _relu(self, z: torch.Tensor) -> torch.Tensor:
        k = self._next()
        frozen = None if self.pattern is None else self.pattern.get(k)
        out = torch.relu(z) if frozen is None else z * frozen.to(z.dtype)
        pos = self._sliding_here(k)
        if pos is not None:
            a = self.sliding.a[pos].to(z.device)
            flat = out.reshape(-1)
            # relu'(z) := 0 on the surface: the value stays relu(z) (~0), the gradient is cut.
            flat = flat.index_put((a,), flat[a].detach())
            out = flat.view_as(z)
            self.h_parts.append((pos, z.reshape(-1)[a]))
            self.signal_parts.append((pos, out, a))
        if self.record:
            self.sites.append(Site(k, "relu", z.detach(), out=out))
        return out

    def _pool(self, func, args, kwargs) -> torch.Tensor:
        k = self._next()
        x = args[0]
        want_indices = bool(kwargs.get("return_indices", False)) or (len(args) > 6 and bool(args[6]))
        kw = dict(kwargs)
        kw["return_indices"] = True
        args = args[:6]
        out, ind = func(*args, **kw)
        if x.ndim == 4:
            planes, area = x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]
        else:  # [C, H, W]
            planes, area = x.shape[0], x.shape[1] * x.shape[2]
        base = (torch.arange(planes, device=x.device) * area).view(planes, 1)
        argmax = (ind.reshape(planes, -1) + base).reshape(out.shape)
        frozen = None if self.pattern is None else self.pattern.get(k)
        if frozen is not None:  # the frozen winners' values (the sites record the true argmax)
            out = x.reshape(-1)[frozen.reshape(-1)].view_as(out)
        pos = self._sliding_here(k)
        if pos is not None:
            a = self.sliding.a[pos].to(x.device)
            b = self.sliding.b[pos].to(x.device)
            o = self.sliding.o[pos].to(x.device)
            xf = x.reshape(-1)
            # On a tie the window's value is x_a (= x_b there) and its whole derivative goes to a.
            # Once per window: index_put's backward hands the full gradient to every duplicate
            # index, so a window tied three ways (two kinks, one o) or named twice (the normals'
            # forward holds an example's kinks and the requested ones) would pass its derivative
            # to x_a twice.  Measured on H-AlexNet: normals 18% off the true ones, and the
            # multiplier iteration contracting by only 6x per correction.
            windows, first = _first_of_each(o)
            out = out.reshape(-1).index_put((windows,), xf[a[first]]).view_as(out)
            self.h_parts.append((pos, xf[a] - xf[b]))
            self.signal_parts.append((pos, out, o))
        if self.record:
            self.sites.append(Site(k, "pool", x.detach(), argmax.detach(), out=out))
        return (out, ind) if want_indices else out


def _first_of_each(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``index`` and, for each, the position of its first occurrence."""
    values, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full_like(values, index.numel()).scatter_reduce(0, inverse, positions, reduce="amin")
    return values, first


def pattern_of(sites: list[Site]) -> dict:
    """The activation pattern recorded by a forward: ReLU masks (``z > 0``) and pool argmaxes,
    by site index, for :class:`KinkMode`'s ``pattern``."""
    return {s.index: (s.z > 0) if s.kind == "relu" else s.argmax.clone() for s in sites}


SUPPORTED = {"ReLU", "relu", "relu_", "MaxPool2d", "max_pool2d"}


def unsupported_kinks(model, operations: Optional[list[str]] = None) -> list[str]:
    """Kinked operations of ``model`` that :class:`KinkMode` does not follow (``operations``:
    ``nonsmooth_operations(model)`` where the caller has it already; it traces the model)."""
    if operations is None:
        from .models.structure import nonsmooth_operations

        operations = nonsmooth_operations(model)
    return [name for name in operations if name not in SUPPORTED]


def relu_crossings(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """Flat indices of ReLU inputs whose sign changed (zero counts as the negative side)."""
    return ((z0 > 0) != (z1 > 0)).reshape(-1).nonzero().flatten()


def pool_crossings(s0: Site, s1: Site) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows whose argmax changed between two forwards: ``(o, a_old, b_new)``, only where the
    window's value is positive (a tie among entries a ReLU has zeroed carries no gradient)."""
    changed = (s0.argmax != s1.argmax).reshape(-1)
    o = changed.nonzero().flatten()
    a = s0.argmax.reshape(-1)[o]
    b = s1.argmax.reshape(-1)[o]
    z1 = s1.z.reshape(-1)
    live = (z1[a] > 0) & (z1[b] > 0)
    return o[live], a[live], b[live]
