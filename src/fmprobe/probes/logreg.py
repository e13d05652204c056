"""L2-regularised logistic regression solved to convergence by L-BFGS, for many labelled subsets and many C at once;
ridge regression in closed form for regression targets.

The objective of every problem is scikit-learn's ``LogisticRegression(solver="lbfgs")``: C times the (sample
weighted) sum of log losses plus half the squared norm of the weights, the intercept unpenalised; multinomial for
multiclass, one sigmoid per label for binary and multilabel (independent problems: one-vs-rest). It is minimised
divided by C x the number of labelled rows (the same minimum), in float64, by a batched L-BFGS: each (subset, C) problem
keeps its own curvature history and its own backtracking (Armijo) line search, and stops when its gradient's
largest entry is below ``tol``; all subsets are evaluated together in a few batched matrix products per step,
finished ones leave the batch, and the C grid is walked from the strongest penalty up, each C starting from the
previous C's solution (a warm start: the same optimum, fewer steps). The result equals scikit-learn's to the
solver tolerance (tested); problems that did not converge in ``max_iter`` steps are reported, never hidden.

Regression (``ridge``): min ||y - Xw - b||^2 + alpha ||w||^2 with alpha = 1 / C (scikit-learn's ``Ridge``), from
one SVD of each centred subset for every alpha.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmprobe.probes.subsets import batches, padded

HISTORY = 10  # curvature pairs kept per problem (scipy's L-BFGS-B keeps 10)
ARMIJO = 1e-4
MAX_HALVINGS = 40


@dataclass
class LinearFit:
    """Weights ``[S, G, D + 1, out]`` (last row: intercept) per subset and C; convergence per problem."""

    weights: torch.Tensor
    converged: np.ndarray  # [S, G] bool
    iterations: np.ndarray  # [S, G]


class _Problems:
    """Loss and gradient of S problems (one subset at one C each), parameters ``W [S, D + 1, out]``."""

    def __init__(self, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, reg: torch.Tensor,
                 multinomial: bool):  # fmt: skip
        self.x, self.y, self.w = x, targets, weights  # [S, n, D + 1] (last column 1), [S, n, out], [S, n(, out)]
        self.reg, self.multinomial = reg, multinomial  # [S]: 1 / (C x labelled rows)
        self.penalised = torch.ones(x.shape[-1], 1, dtype=torch.float64)
        self.penalised[-1] = 0.0  # the intercept

    def take(self, index: torch.Tensor) -> _Problems:
        return _Problems(self.x[index], self.y[index], self.w[index], self.reg[index], self.multinomial)

    def loss_grad(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective ``[S]`` and gradient ``[S, D + 1, out]``."""
        logits = torch.bmm(self.x, params)
        if self.multinomial:
            logp = torch.log_softmax(logits, -1)
            w = self.w[..., None]
            loss = -(w * self.y * logp).sum((-1, -2))
            delta = w * (logp.exp() - self.y)
        else:
            loss = (self.w * (F.softplus(logits) - self.y * logits)).sum((-1, -2))
            delta = self.w * (torch.sigmoid(logits) - self.y)
        shrunk = params * self.penalised
        loss = loss + 0.5 * self.reg * (shrunk * params).sum((-1, -2))
        grad = torch.bmm(self.x.transpose(1, 2), delta) + self.reg[:, None, None] * shrunk
        return loss, grad


def _directions(grad: torch.Tensor, s_hist: list[torch.Tensor], y_hist: list[torch.Tensor],
                rho: list[torch.Tensor], gamma: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """L-BFGS two-loop recursion per problem (rows of the flattened ``grad [P, d]``); pairs with rho 0 are inert."""
    q = grad.clone()
    alphas = []
    for s, y, r in zip(reversed(s_hist), reversed(y_hist), reversed(rho)):
        a = r * (s * q).sum(1)
        q -= a[:, None] * y
        alphas.append(a)
    q *= gamma[:, None]
    for s, y, r, a in zip(s_hist, y_hist, rho, reversed(alphas)):
        b = r * (y * q).sum(1)
        q += s * (a - b)[:, None]
    return -q


@torch.no_grad()
def lbfgs(problems: _Problems, start: torch.Tensor, *, tol: float, max_iter: int
          ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:  # fmt: skip
    """Minimise every problem from ``start [S, D + 1, out]``: (solutions, converged ``[S]``, iterations ``[S]``).
    A finished problem leaves the batch once a quarter of the batch has finished (no work on it after)."""
    shape = start.shape[1:]
    solution, converged = start.clone(), np.zeros(len(start), dtype=bool)
    iterations = np.zeros(len(start), dtype=np.int64)
    active = torch.arange(len(start))
    loss, grad = problems.loss_grad(start)
    x, g, f = start.reshape(len(start), -1).clone(), grad.reshape(len(start), -1), loss
    done = g.abs().amax(1) <= tol
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho: list[torch.Tensor] = []
    gamma = 1.0 / g.norm(dim=1).clamp_min(1.0)  # no curvature yet: a first step of unit length

    def leave(keep: torch.Tensor) -> None:  # write the finished problems out; continue with ``keep``
        nonlocal problems, active, x, g, f, done, gamma, s_hist, y_hist, rho
        gone = ~keep
        solution[active[gone]] = x[gone].view(-1, *shape)
        converged[active[gone].numpy()] = (g[gone].abs().amax(1) <= tol).numpy()
        problems, active = problems.take(keep), active[keep]
        x, g, f, done, gamma = x[keep], g[keep], f[keep], done[keep], gamma[keep]
        s_hist, y_hist, rho = [t[keep] for t in s_hist], [t[keep] for t in y_hist], [t[keep] for t in rho]

    for _ in range(max_iter):
        if bool(done.all()):
            break
        if 4 * int(done.sum()) >= len(done):
            leave(~done)
        d = _directions(g, s_hist, y_hist, rho, gamma)
        slope = (g * d).sum(1)
        steep = slope >= 0  # not a descent direction: restart from the gradient
        d[steep], slope[steep] = -g[steep], -(g[steep] ** 2).sum(1)
        d[done], slope[done] = 0.0, 0.0
        step = torch.ones_like(f)
        accepted = done.clone()
        x_new, g_new, f_new = x.clone(), g.clone(), f.clone()
        for _ in range(MAX_HALVINGS):
            trial = x + step[:, None] * d
            loss_t, grad_t = problems.loss_grad(trial.view(-1, *shape))
            grad_t = grad_t.reshape(len(trial), -1)
            ok = ~accepted & (loss_t <= f + ARMIJO * step * slope)
            x_new[ok], g_new[ok], f_new[ok] = trial[ok], grad_t[ok], loss_t[ok]
            accepted |= ok
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step / 2)
        stalled = ~accepted  # no decrease at any step: at the float64 floor of its objective
        s_new, y_new = x_new - x, g_new - g
        sy, yy = (s_new * y_new).sum(1), (y_new * y_new).sum(1)
        useful = sy > 1e-12 * yy.clamp_min(1e-300)
        s_hist.append(s_new)
        y_hist.append(y_new)
        rho.append(torch.where(useful, 1.0 / sy.where(useful, torch.ones_like(sy)), torch.zeros_like(sy)))
        gamma = torch.where(useful, sy / yy.clamp_min(1e-300), gamma)
        if len(s_hist) > HISTORY:
            s_hist.pop(0), y_hist.pop(0), rho.pop(0)
        iterations[active.numpy()] += (~done).numpy()
        x, g, f = x_new, g_new, f_new
        done = done | stalled | (g.abs().amax(1) <= tol)
    leave(torch.zeros(len(active), dtype=torch.bool))
    return solution, converged, iterations


def by_size(fit_batch: Callable[[list[int]], LinearFit], subsets: Sequence[np.ndarray], cells_per_row: int
            ) -> LinearFit:  # fmt: skip
    """``fit_batch(indices)`` on batches of subsets of similar size (little padding, bounded memory), joined in the
    order of ``subsets``."""
    parts = [(batch, fit_batch(batch)) for batch in batches(subsets, cells_per_row)]
    order = np.argsort(np.concatenate([batch for batch, _ in parts]), kind="stable")
    return LinearFit(torch.cat([f.weights for _, f in parts])[torch.from_numpy(order)],
                     np.concatenate([f.converged for _, f in parts])[order],
                     np.concatenate([f.iterations for _, f in parts])[order])  # fmt: skip


def fit_logistic(x_train: torch.Tensor, targets: torch.Tensor, subsets: Sequence[np.ndarray], cs: Sequence[float], *,
                 multinomial: bool, weights: Sequence[np.ndarray] | None = None, tol: float = 1e-6,
                 max_iter: int = 1000) -> LinearFit:  # fmt: skip
    """Logistic regression of every subset at every C. ``targets [n_train, out]``: one-hot classes (multinomial)
    or 0/1 labels; ``weights``: per subset, its rows' sample weights ``[n]`` (multinomial) or element weights
    ``[n, out]`` (scikit-learn's ``class_weight``); none: unweighted."""

    def fit_batch(batch: list[int]) -> LinearFit:
        return _logistic([subsets[i] for i in batch], x_train, targets, cs, multinomial,
                         None if weights is None else [weights[i] for i in batch], tol, max_iter)  # fmt: skip

    return by_size(fit_batch, subsets, cells_per_row=x_train.shape[1] + 4 * len(cs) * targets.shape[1])


def _logistic(subsets: Sequence[np.ndarray], x_train: torch.Tensor, targets: torch.Tensor, cs: Sequence[float],
              multinomial: bool, weights: Sequence[np.ndarray] | None, tol: float, max_iter: int) -> LinearFit:  # fmt: skip
    rows, mask = padded(subsets)
    x = x_train.double()[rows]
    shape = (len(subsets), rows.shape[1]) + (() if multinomial else (targets.shape[1],))
    w = torch.zeros(shape, dtype=torch.float64)
    for i, s in enumerate(subsets):
        w[i, : len(s)] = 1.0 if weights is None else torch.as_tensor(weights[i], dtype=torch.float64)
    basis = None
    if x.shape[1] < x.shape[2]:
        # Fewer labelled rows than features: the optimum's weights lie in the span of the rows (the penalty zeroes
        # the rest), so each problem is solved in an orthonormal basis of that span — the same L-BFGS iterates,
        # on n coordinates instead of D.
        basis = torch.linalg.svd(x, full_matrices=False)[2]  # [S, n, D]
        x = x @ basis.transpose(1, 2)
    x = F.pad(x, (0, 1), value=1.0)  # the intercept's column
    count = mask.sum(1).double()
    w = w / count.view(-1, *[1] * (w.ndim - 1))  # sample (element) weights over labelled rows
    y = targets.double()[rows]
    weights_out = torch.zeros(len(subsets), len(cs), x.shape[-1], targets.shape[1], dtype=torch.float64)
    converged = np.zeros((len(subsets), len(cs)), dtype=bool)
    iterations = np.zeros((len(subsets), len(cs)), dtype=np.int64)
    params = torch.zeros(len(subsets), x.shape[-1], targets.shape[1], dtype=torch.float64)
    for g in np.argsort(cs):  # from the strongest penalty up, each C starting from the previous C's solution
        problems = _Problems(x, y, w, 1.0 / (cs[g] * count), multinomial)
        params, converged[:, g], iterations[:, g] = lbfgs(problems, params, tol=tol, max_iter=max_iter)
        weights_out[:, g] = params
    if basis is not None:
        coefs = torch.einsum("snd,sgno->sgdo", basis, weights_out[:, :, :-1])
        weights_out = torch.cat([coefs, weights_out[:, :, -1:]], dim=2)
    return LinearFit(weights_out, converged, iterations)


def fit_ridge(x_train: torch.Tensor, targets: torch.Tensor, subsets: Sequence[np.ndarray],
              cs: Sequence[float]) -> LinearFit:  # fmt: skip
    """Ridge regression (alpha = 1 / C) of every subset at every C, with an unpenalised intercept."""
    return by_size(lambda batch: _ridge([subsets[i] for i in batch], x_train, targets, cs), subsets,
                   cells_per_row=2 * x_train.shape[1])  # fmt: skip


def _ridge(subsets: Sequence[np.ndarray], x_train: torch.Tensor, targets: torch.Tensor, cs: Sequence[float]
           ) -> LinearFit:  # fmt: skip
    rows, mask = padded(subsets)
    m = mask.double()[..., None]  # [S, n, 1]
    x, y = x_train.double()[rows], targets.double()[rows]
    count = m.sum(1, keepdim=True)
    x_mean, y_mean = (m * x).sum(1, keepdim=True) / count, (m * y).sum(1, keepdim=True) / count
    u, sv, vh = torch.linalg.svd((x - x_mean) * m, full_matrices=False)  # padded rows are zero
    uty = u.transpose(1, 2) @ ((y - y_mean) * m)  # [S, r, T]
    alpha = 1.0 / torch.as_tensor(cs, dtype=torch.float64)
    shrink = sv[:, None, :] / (sv[:, None, :] ** 2 + alpha[None, :, None])  # [S, G, r]
    w = torch.einsum("srd,sgr,srt->sgdt", vh, shrink, uty)  # [S, G, D, T]
    b = y_mean[:, None, 0, :] - torch.einsum("sd,sgdt->sgt", x_mean[:, 0], w)
    shape = w.shape[:2]
    return LinearFit(torch.cat([w, b[:, :, None]], dim=2), np.ones(shape, dtype=bool), np.zeros(shape, dtype=np.int64))


def linear_outputs(fit: LinearFit, x: torch.Tensor) -> torch.Tensor:
    """Raw outputs ``[S, G, N, out]`` of every fitted problem on rows ``x [N, D]``."""
    return torch.einsum("nd,sgdo->sgno", F.pad(x.double(), (0, 1), value=1.0), fit.weights)


def subset_outputs(fit: LinearFit, x_train: torch.Tensor, subsets: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Raw outputs ``[G, n, out]`` of each subset's problems on its own labelled rows."""
    xs = F.pad(x_train.double(), (0, 1), value=1.0)
    return [torch.einsum("nd,gdo->gno", xs[torch.from_numpy(np.asarray(s))], fit.weights[i])
            for i, s in enumerate(subsets)]  # fmt: skip
