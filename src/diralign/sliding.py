"""The Filippov (sliding-mode) velocity of the gradient flow of a ReLU / max-pool network.

    python -c "from diralign.sliding import SlidingField; help(SlidingField)"

Where a kink function ``h`` (see :mod:`diralign.kinks`) reaches 0 and the flow on both
sides pushes toward the surface, the Clarke gradient flow *slides* along it (measured:
on H-AlexNet, 16 digits, about 7 kinks per example do so at any time past ``s = 1``, and
an unaware integrator crosses each of them at every step).  On the intersection
``M = {h_a = 0, a in S}`` of the sliding surfaces the flow's velocity is ``-P_T g``, where
``g`` is a one-sided gradient of ``log L`` and ``P_T`` the orthogonal projection onto the
tangent space ``T = {u : <grad h_a, u> = 0}``: every derivative choice at the sliding kinks
changes ``g`` only along ``span{grad h_a}`` (a kink's contribution is its backward signal
times ``grad h_a``; kinks in series add multiples of the upstream normals), so the
tangential part is the same for all of them, and the Filippov combination is the one with
no normal part.  Hence no convex-combination weights need solving: ``v = g - N^T lam`` with
``N`` the kinks' normals and multipliers ``lam`` such that ``N v = 0``.

**Cost.**  ``N^T lam`` is the gradient of ``lam . h``, so ``g - N^T lam`` is *one* backward
pass of ``log L - lam . h``.  The multipliers solve ``(N N^T) lam = N g - kappa |v|^2 h``
(``kappa``: a Baumgarte pull back onto ``M`` against integration drift), and ``N u`` is the
directional derivative of ``h``: a forward finite difference, one forward pass.  So an
evaluation is: forward + backward of ``log L`` (``g``, ``h``), forward at ``w + eps g``
(``N g``), solve with ``N N^T``, backward of ``lam . h`` through the same graph (``N^T lam``):
about 2 gradient evaluations.  ``N N^T`` itself comes from the normals, one backward per
kink on its own example (``normals``), and is refreshed when the held set grows or the
field's residual check says the stored one has gone stale; a release only drops its row.
The Gram is the iteration's preconditioner: every correction ``N^T dlam`` is an exact backward
pass, so a stale Gram slows the contraction and never biases the velocity.

The multipliers also tell whether a kink keeps sliding: the weight ``theta`` of its
positive side in the Filippov combination is ``-lam/delta`` (ReLU, whose side is fixed at
``relu' = 0``) or ``1 - lam/delta`` (pool, the derivative held on entry ``a``), with
``delta`` the backward signal at the unit's output.  It leaves the surface when ``theta``
leaves ``[0, 1]``, to the side it then points to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .kinks import KinkMode, KinkSet, Site
from .problem import Problem

FD_STEP = 3e-8  # forward difference step for N u, relative to ||w|| / ||u|| (truncation ~ rounding)
WILD = 1e-3  # a relative normal speed left above this: the multipliers diverged, not kept
KAPPA = 1.0  # Baumgarte rate (per unit of s) pulling h back to 0 on the sliding surfaces
STALE_CONTRACTION = 0.3  # a correction shrinking the normal speed less than this: N N^T is stale
STALE_AFTER = 2  # (from this attempt on)


@dataclass
class FieldPoint:
    """The sliding flow's state at ``w``: what a step needs and what the probes read."""

    w: torch.Tensor
    log_risk: float
    margins: torch.Tensor
    v: torch.Tensor  # Filippov velocity in the log L clock: dW/dt = -v (the flow's gradient)
    h: torch.Tensor  # kink values of the sliding set (should be ~0)
    lam: torch.Tensor  # multipliers
    theta: torch.Tensor  # positive-side weights (in [0, 1] while a kink slides)
    delta: torch.Tensor = None  # backward signals at the sliding units' outputs
    sites: list = field(default_factory=list)  # watch-list records of this forward
    grad_evals: float = 0.0  # gradient-equivalents spent on this point
    lam_in: Optional[dict] = None  # the multiplier prediction it started from (exact resume)

    @property
    def correct(self) -> int:
        return int((self.margins > 0).sum())

    def s_velocity(self) -> torch.Tensor:
        """``dW/ds = -v/||v||^2`` (the clock ``s = ln(n/L)``)."""
        return -self.v / torch.dot(self.v, self.v)


def example_sizes(sites: list[Site], n: int) -> list[int]:
    return [s.z.numel() // n for s in sites]


class SlidingField:
    """Evaluate the sliding flow at ``w`` for the current sliding set ``S``."""

    # Cost weights of the pieces, in gradient evaluations (forward = 1/3, backward = 2/3).
    FORWARD = 1.0 / 3.0

    def __init__(self, problem: Problem, kappa: float = KAPPA):
        self.problem = problem
        self.kappa = float(kappa)
        self.sliding = KinkSet()
        self.gram_chol: Optional[torch.Tensor] = None  # Cholesky factor of N N^T (stale allowed)
        self.normals: Optional[torch.Tensor] = None  # N at the last refresh
        self.normals_w: Optional[torch.Tensor] = None
        # The sliding set the normals were computed for (each example's rows in the context of
        # its held kinks): releases drop rows without recomputing them, and a resumed run
        # recomputes them for this set at normals_w, then drops the same rows.
        self.normals_context: Optional[KinkSet] = None
        self.normals_keys: list = []  # the kinks the rows of normals belong to, in order
        self.tolerance = 1e-7  # relative normal speed left in v (the dynamics sets 0.1 rtol)
        self._lam: Optional[torch.Tensor] = None
        self._lam_keys: list = []
        self.last_residual = 0.0
        self.before_forward = None  # called before every pass (the dynamics' abort check)
        self.pattern: Optional[dict] = None  # a frozen activation pattern (KinkMode's), or None
        self.dropped = 0  # held kinks dropped because their normal vanished (refresh_normals)
        self._first_site_linear: Optional[bool] = None  # z of the first kinked call is linear in W

    # -- forward passes -----------------------------------------------------------------
    def _forward(self, w: torch.Tensor, sliding: Optional[KinkSet], graph: bool, record: bool = True):
        if self.before_forward is not None:
            self.before_forward()
        problem = self.problem
        mode = KinkMode(sliding, record=record, pattern=self.pattern)
        if graph:
            w = w.detach().requires_grad_(True)
        context = torch.enable_grad() if graph else torch.no_grad()
        with context:
            with mode:
                out = problem.forward(w, problem.X)
            log_losses, margins = problem._log_losses_and_margins(out, problem.y)
            log_risk = torch.logsumexp(log_losses, dim=0)
        return w, log_risk, margins.detach(), mode

    def kink_values(self, w: torch.Tensor, sliding: KinkSet) -> torch.Tensor:
        _, _, _, mode = self._forward(w, sliding, graph=False, record=False)
        return mode.h.detach()

    def watch(self, w: torch.Tensor) -> tuple[float, torch.Tensor, list[Site]]:
        """``log L``, margins and the watch-list at ``w`` (a forward pass only)."""
        _, log_risk, margins, mode = self._forward(w, self.sliding if len(self.sliding) else None, graph=False)
        return float(log_risk.detach()), margins, mode.sites

    # -- the field ------------------------------------------------------------------------
    def lam_state(self) -> dict:
        return {"lam": None if self._lam is None else self._lam.clone(), "keys": list(self._lam_keys)}

    def load_lam_state(self, state: Optional[dict]) -> None:
        state = state or {"lam": None, "keys": []}
        self._lam = None if state["lam"] is None else state["lam"].clone()
        self._lam_keys = [tuple(k) for k in state["keys"]]

    def refresh_normals(self, w: torch.Tensor, sites: list[Site]) -> float:
        N, spent = self.normals_at(w, sites)
        live = live_normals(N)
        if not bool(live.all()):
            # A held kink whose normal has become 0 is implied by others: a pool tie between
            # two units that are themselves held at their ReLU kink (both entries 0, and
            # relu' = 0 on the held side).  It constrains nothing, yet the forward difference
            # in N v sees the held units' rounding-level moves through it, and with a zero row
            # in N N^T its multiplier is that noise over the ridge.  Measured on H-AlexNet
            # (16 digits, s = 26.7 to 27.1): with one such kink held, 10,000 gradients for
            # 0.4 of s; without, ~150 per 0.1 of s; from s = 25 to 30, 29,015 gradients before
            # such kinks were dropped, 13,154 after.  Nothing holds it; it goes.
            self.sliding = self.sliding.subset(live.nonzero().flatten())
            self.dropped += int((~live).sum())
            N = N[live]
        self.gram_chol = gram_cholesky(N)
        self.normals, self.normals_w = N, w.detach().clone()
        self.normals_context = self.sliding
        self.normals_keys = self.sliding.keys()
        return spent

    def release(self, keep: torch.Tensor) -> None:
        """Hold only the kinks at positions ``keep`` of the sliding set.  The stored normals
        lose the released rows and the Gram is refactored from the rest, not recomputed (a
        refresh is a backward per held kink on its example: ~3 gradients on H-AlexNet with 60
        held, after each of ~80 releases per unit of s).  Rows on the released kink's example
        may have changed (its unit now passes a derivative), but the Gram only preconditions
        the multiplier iteration, whose corrections are exact, and where it stops contracting
        the staleness check refreshes it."""
        aligned = self.normals is not None and self.normals_keys == self.sliding.keys()
        self.sliding = self.sliding.subset(keep)
        if aligned and len(self.sliding):
            self.normals = self.normals[keep]
            self.normals_keys = self.sliding.keys()
            self.gram_chol = gram_cholesky(self.normals)
        else:
            self.gram_chol = None

    def restore_normals(self, w: torch.Tensor, context: Optional[KinkSet]) -> None:
        """The stored normals as they were: computed at ``w`` for ``context``, then restricted
        to the current sliding set (the rows releases kept).  For an exact resume."""
        current, dropped = self.sliding, self.dropped
        self.sliding = current if context is None else context
        _, _, sites = self.watch(w)
        self.refresh_normals(w, sites)
        self.dropped = dropped  # (counted when the original run dropped them)
        if context is None:
            return  # (the rows are the current set's own)
        index = {k: i for i, k in enumerate(self.sliding.keys())}
        rows = [index.get(k) for k in current.keys()]
        self.sliding = current
        if any(i is None for i in rows):  # not a subset: the current set's own rows, then
            self.refresh_normals(w, sites)
            self.dropped = dropped
            return
        self.normals = self.normals[torch.tensor(rows, dtype=torch.long)]
        self.normals_keys = current.keys()
        self.gram_chol = gram_cholesky(self.normals) if len(rows) else None

    def evaluate(self, w: torch.Tensor) -> FieldPoint:
        lam_in = self.lam_state()
        point = self._evaluate(w)
        point.lam_in = lam_in
        return point

    def _evaluate(self, w: torch.Tensor) -> FieldPoint:
        sliding = self.sliding if len(self.sliding) else None
        wg, log_risk, margins, mode = self._forward(w, sliding, graph=True)
        if sliding is None:
            g = self._backward(log_risk, wg, mode.sites, retain=False)
            empty = g.new_zeros(0)
            return FieldPoint(w, float(log_risk.detach()), margins, g, empty, empty, empty, empty, mode.sites, 1.0)
        h = mode.h
        hd = h.detach()
        held = len(self.sliding)
        chol, cost = self._gram(w, mode.sites)
        if len(self.sliding) != held:  # kinks with vanished normals were dropped: redo the forward
            point = self._evaluate(w)
            point.grad_evals += cost + self.FORWARD
            return point
        # One backward of log L - lam_p . h with the multipliers predicted from the last point
        # (they vary smoothly along the flow), then the residual N v - kappa |v|^2 h by a
        # forward difference, and the correction -N^T M_0^{-1} r with the stored Gram M_0: the
        # backward of dlam . h through the same graph, which also updates the backward signals
        # delta at the sliding units (theta = -lam/delta reads them: with kinks in series an
        # upstream unit's delta holds the downstream kinks' lam).  Exact in N, so the stored
        # normals' error only slows the contraction; a residual certifies the result.  (The
        # stored rows N_0^T dlam instead, saving that backward once, left a tangential error
        # (N_0 - N)^T dlam no residual sees: a median 5e-8 and up to 5e-2 of |v| on H-AlexNet.)
        lam = self._predicted_multipliers(hd)
        phi = log_risk - torch.dot(lam, h)
        outputs = mode.signal_tensors
        v = self._backward(phi, wg, mode.sites, retain=True)
        delta = sliding_signals(self.sliding, mode.sites)
        cost += 1.0
        # Kinks of the first kinked call only, whose input is linear in W (a bias-free first
        # layer): their normals are constant, the stored rows are exact, and no kink is in
        # series with another (delta does not move), so no backward is needed.
        stored_rows_exact = bool((self.sliding.site == 0).all()) and self._first_site_is_linear(w)
        N0 = self.normals
        previous = math.inf
        converged = False
        for attempt in range(5):
            resid = self._directional(w, v, hd) - self.kappa * float(torch.dot(v, v)) * hd
            cost += self.FORWARD
            dlam = torch.cholesky_solve(resid[:, None], chol)[:, 0]
            # ||N^T dlam|| ~ sqrt(dlam . r): the normal speed this point's velocity still has.
            normal = math.sqrt(max(float(torch.dot(dlam, resid)), 0.0))
            self.last_residual = normal / max(float(v.norm()), 1e-300)
            if self.last_residual <= self.tolerance:
                converged = True
                break
            if attempt >= STALE_AFTER and normal > STALE_CONTRACTION * previous:
                self.gram_chol = None  # N N^T has gone stale: the iteration contracts slowly
            previous = normal
            lam = lam + dlam
            if stored_rows_exact:
                v = v - N0.T @ dlam
                continue
            pull, *signals = torch.autograd.grad(h, [wg] + outputs, grad_outputs=dlam, retain_graph=True, allow_unused=True)
            cost += 2.0 / 3.0
            v = v - pull
            delta = delta - mode.signals([torch.zeros_like(t) if g is None else g for t, g in zip(outputs, signals)]).to(delta)
        if converged or (self.last_residual <= WILD and bool(torch.isfinite(v).all())):
            self._remember(lam)
        else:
            # Multipliers of a trial point far off the surfaces must not seed the next
            # evaluation: measured on H-AlexNet, one such point left lam ~ 1e157 behind, and
            # every later field was infinite (both integrators stopped at s = 26.38).  (Forgetting
            # every unconverged one instead cost 10x the evaluations there.)
            self.forget_multipliers()
        theta = self._theta(lam, delta)
        return FieldPoint(
            w,
            float(log_risk.detach()),
            margins,
            v.detach(),
            hd,
            lam.detach(),
            theta,
            delta.detach(),
            mode.sites,
            cost,
        )

    def _first_site_is_linear(self, w: torch.Tensor) -> bool:
        """Whether the first kinked call's input is linear in ``W``: its second difference
        along a seeded direction a tenth of ``||W||`` long vanishes to rounding.  Three
        forward passes, once per field (a structural fact of the model, not counted)."""
        if self._first_site_linear is None:
            gen = torch.Generator(device="cpu").manual_seed(0)
            u = torch.randn(w.numel(), generator=gen, dtype=w.dtype).to(w.device)
            u = 0.1 * float(w.norm()) / float(u.norm()) * u
            with torch.no_grad():
                z = [self._first_site_input(w + t * u) for t in (-1.0, 0.0, 1.0)]
            second = float((z[0] - 2 * z[1] + z[2]).norm())
            first = float((z[2] - z[0]).norm())
            self._first_site_linear = second <= 1e-10 * max(first, 1e-300)
        return self._first_site_linear

    def _first_site_input(self, w: torch.Tensor) -> torch.Tensor:
        mode = KinkMode(record=True)
        with mode:
            self.problem.forward(w, self.problem.X)
        return mode.sites[0].z.reshape(-1)

    @staticmethod
    def _backward(phi: torch.Tensor, wg: torch.Tensor, sites: list[Site], retain: bool) -> torch.Tensor:
        """``d phi/dw``, and each site's backward signal ``d phi/d(out)`` stored on the site (the
        size of the jump a kink there makes in the gradient, with its normal's norm)."""
        outs = [s.out for s in sites]
        grads = torch.autograd.grad(phi, [wg] + outs, retain_graph=retain, allow_unused=True)
        for site, g in zip(sites, grads[1:]):
            site.signal = torch.zeros_like(site.out).detach() if g is None else g.detach()
            site.out = None  # the graph is not needed beyond this point
        return grads[0]

    def probe_normals(self, w: torch.Tensor, probes: int = 2, seed: int = 0) -> tuple[list[torch.Tensor], float]:
        """Directional derivatives of every kink-site input along ``probes`` seeded Gaussian
        directions ``r`` (``E[(grad z . r)^2] = ||grad z||^2``), by forward differences: the
        scale of every kink's normal at once for ``probes`` forward passes."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        _, _, base = self.watch(w)
        samples = [[] for _ in base]
        for _ in range(probes):
            r = torch.randn(w.numel(), generator=gen, dtype=w.dtype).to(w.device)
            eps = FD_STEP * max(float(w.norm()), 1e-300) / float(r.norm())
            _, _, moved = self.watch(w + eps * r)
            for out, s0, s1 in zip(samples, base, moved):
                out.append(((s1.z - s0.z) / eps).reshape(-1))
        return [torch.stack(x) for x in samples], probes * self.FORWARD + self.FORWARD

    def _predicted_multipliers(self, h: torch.Tensor) -> torch.Tensor:
        keys = self.sliding.keys()
        if self._lam is not None and self._lam_keys == keys:
            return self._lam.clone()
        lam = torch.zeros(len(keys), dtype=h.dtype, device=h.device)
        if self._lam is not None:
            old = {k: i for i, k in enumerate(self._lam_keys)}
            for i, k in enumerate(keys):
                if k in old:
                    lam[i] = self._lam[old[k]]
        return lam

    def _remember(self, lam: torch.Tensor) -> None:
        self._lam = lam.detach().clone()
        self._lam_keys = self.sliding.keys()

    def forget_multipliers(self) -> None:
        self._lam, self._lam_keys = None, []

    def _theta(self, lam: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        safe = torch.where(delta.abs() > 0, delta, torch.full_like(delta, 1e-300))
        ratio = lam / safe
        pool = self.sliding.is_pool.to(lam.device)
        theta = torch.where(pool, 1.0 - ratio, -ratio)
        # A window tied among three entries or more: runner-up j has weight lam_j/delta, the
        # winner a what is left, 1 - sum_j lam_j/delta.  Where that goes negative, a leaves the
        # tie: its entries get the winner's weight, so that the window as a whole is released.
        if bool(pool.any()):
            windows = {}
            for i, (st, o, is_pool) in enumerate(
                zip(self.sliding.site.tolist(), self.sliding.o.tolist(), pool.tolist())
            ):
                if is_pool:
                    windows.setdefault((st, o), []).append(i)
            for entries in windows.values():
                if len(entries) > 1:
                    idx = torch.tensor(entries, device=lam.device)
                    winner = 1.0 - ratio[idx].sum()
                    if float(winner) < 0:
                        theta[idx] = torch.minimum(theta[idx], winner)
        return theta

    def _directional(self, w: torch.Tensor, u: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """``N u``: forward difference of the sliding kinks' values along ``u``."""
        un = float(u.norm())
        if un == 0:
            return torch.zeros_like(h0)
        eps = FD_STEP * max(float(w.norm()), 1e-300) / un
        h1 = self.kink_values(w + eps * u, self.sliding)
        return (h1 - h0) / eps

    # -- normals and their Gram matrix ----------------------------------------------------
    def _gram(self, w: torch.Tensor, sites: list[Site]) -> tuple[torch.Tensor, float]:
        spent = 0.0
        if self.gram_chol is None or self.normals_keys != self.sliding.keys():
            spent = self.refresh_normals(w, sites)
        return self.gram_chol, spent

    def normals_at(
        self, w: torch.Tensor, sites: list[Site], kinks: Optional[KinkSet] = None
    ) -> tuple[torch.Tensor, float]:
        """The rows ``grad h_a`` of ``N``: per example holding kinks, one forward of that example
        alone and one batched backward over its kinks (``is_grads_batched``).  Costs about
        ``(#examples with kinks + #kinks) / n`` gradient evaluations."""
        problem = self.problem
        kinks = self.sliding if kinks is None else kinks
        n = problem.n
        sizes_in = {s.index: s.z.numel() // n for s in sites}
        sizes_out = {s.index: (s.argmax.numel() // n if s.argmax is not None else 0) for s in sites}
        site_l = kinks.site.tolist()
        per = torch.tensor([sizes_in[k] for k in site_l], dtype=torch.long)
        example = kinks.a // per
        rows = torch.zeros(len(kinks), problem.dim, dtype=problem.dtype, device=problem.device)
        spent = 0.0
        for i in torch.unique(example).tolist():
            mine = (example == i).nonzero().flatten()
            # The sliding set restricted to example i, re-indexed to a batch of one.
            own = (
                self.sliding.a // torch.tensor([sizes_in[k] for k in self.sliding.site.tolist()], dtype=torch.long)
            ) == i
            local = self.sliding.subset(own.nonzero().flatten())
            local = _shift(local, i, sizes_in, sizes_out)
            target = _shift(kinks.subset(mine), i, sizes_in, sizes_out)
            both = KinkSet(
                torch.cat([local.site, target.site]),
                torch.cat([local.a, target.a]),
                torch.cat([local.b, target.b]),
                torch.cat([local.o, target.o]),
            )
            mode = KinkMode(both, record=False)
            wg = w.detach().requires_grad_(True)
            with torch.enable_grad():
                with mode:
                    problem.forward(wg, problem.X[i : i + 1])
                h = mode.h[len(local) :]
                eye = torch.eye(h.numel(), dtype=h.dtype, device=h.device)
                (jac,) = torch.autograd.grad(h, wg, grad_outputs=eye, is_grads_batched=True)
            rows[mine] = jac
            spent += (1.0 + 2.0 * h.numel()) / (3.0 * n)
        return rows, spent


def sliding_signals(sliding: KinkSet, sites: list[Site]) -> torch.Tensor:
    """Backward signal ``delta`` at each sliding kink's unit output (ReLU) or window (pool)."""
    delta = torch.zeros(len(sliding), dtype=torch.float64)
    by_site = {s.index: s for s in sites}
    for k in torch.unique(sliding.site).tolist():
        pos = (sliding.site == k).nonzero().flatten()
        site = by_site[k]
        idx = sliding.o[pos] if site.kind == "pool" else sliding.a[pos]
        delta[pos] = site.signal.reshape(-1)[idx].double().cpu()
    return delta.to(sites[0].z.dtype) if sites else delta


def live_normals(N: torch.Tensor) -> torch.Tensor:
    """Rows of ``N`` that are not 0 (relative to the largest): the kinks that constrain ``W``."""
    norms = N.norm(dim=1)
    if not len(norms):
        return norms > 0
    return norms > 1e-12 * max(float(norms.max()), 1e-300)


def gram_cholesky(N: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``N N^T`` with a relative ridge of 1e-13 (duplicate normals: two
    examples with the same input, or a unit sliding on two examples with parallel inputs)."""
    gram = N @ N.T
    # (zero rows never come here: refresh_normals drops the kinks they belong to)
    ridge = 1e-13 * float(gram.diagonal().max()) if gram.numel() else 0.0
    return torch.linalg.cholesky(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def _shift(kinks: KinkSet, i: int, sizes_in: dict, sizes_out: dict) -> KinkSet:
    sites = kinks.site.tolist()
    din = torch.tensor([sizes_in[k] * i for k in sites], dtype=torch.long)
    dout = torch.tensor([sizes_out[k] * i for k in sites], dtype=torch.long)
    pool = kinks.b >= 0
    return KinkSet(
        kinks.site.clone(),
        kinks.a - din,
        torch.where(pool, kinks.b - din, kinks.b),
        torch.where(pool, kinks.o - dout, kinks.o),
    )


def project(
    field: SlidingField, w: torch.Tensor, sites: list[Site], iterations: int = 4, tol: float = 1e-13
) -> tuple[torch.Tensor, float]:
    """Newton steps ``w <- w - N^T (N N^T)^{-1} h(w)`` onto the sliding surfaces ``h = 0``
    (the normals refreshed at ``w``); returns the point and the gradient-equivalents spent."""
    spent = 0.0
    if not len(field.sliding):
        return w, spent
    spent = field.refresh_normals(w, sites)  # (drops held kinks whose normal vanished)
    N, chol = field.normals, field.gram_chol
    if not len(field.sliding):
        return w, spent
    scale = float(w.norm())
    for _ in range(iterations):
        h = field.kink_values(w, field.sliding)
        spent += SlidingField.FORWARD
        step = N.T @ torch.cholesky_solve(h[:, None], chol)[:, 0]
        w = w - step
        if float(step.norm()) <= tol * scale:
            break
    # field.normals_w stays where N was computed (before the Newton steps): a resumed run
    # recomputes the normals there and gets the same ones (set to the projected point, the
    # explicit pair's resume on a ReLU MLP drifted by up to 5e-9 relative in one step).
    return w, spent
