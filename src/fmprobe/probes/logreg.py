"""L2-regularised logistic regression solved to convergence by L-BFGS, for many labelled subsets and many C at once;
ridge regression in closed form for regression targets.

The objective of every problem is scikit-learn's ``LogisticRegression(solver="lbfgs")``: C times the (sample
weighted) sum of log losses plus half the squared norm of the weights, the intercept unpenalised; multinomial for
multiclass, one sigmoid per label for binary and multilabel (independent problems: one-vs-rest). It is minimised
divided by C x the number of labelled rows (the same minimum), in float64, by a batched L-BFGS: each (subset, C) problem
keeps its own curvature history and its own backtracking (Armijo) line search, and stops when its gradient's
largest entry is below ``tol``; all problems are evaluated together in a few tensor contractions per step. The
result equals scikit-learn's to the solver tolerance (tested); problems that did not converge in ``max_iter``
steps are reported, never hidden.

Regression (``ridge``): min ||y - Xw - b||^2 + alpha ||w||^2 with alpha = 1 / C (scikit-learn's ``Ridge``), from
one SVD of each centred subset for every alpha.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmprobe.probes.subsets import padded

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
    """Loss, gradient and scores of the (subset, C) problems, parameters ``W [S, G, D + 1, out]``."""

    def __init__(self, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, count: torch.Tensor,
                 cs: Sequence[float], multinomial: bool):  # fmt: skip
        self.x = F.pad(x, (0, 1), value=1.0)  # [S, n, D + 1], the last column the intercept's
        self.y, self.multinomial = targets, multinomial  # y [S, n, out] (one-hot for multinomial)
        self.w = weights / count.view(-1, *[1] * (weights.ndim - 1))  # sample (element) weights / labelled rows
        c = torch.as_tensor(cs, dtype=torch.float64)
        self.reg = 1.0 / (c[None, :] * count[:, None])  # [S, G]: 1 / (C x labelled rows)
        self.penalised = torch.ones(self.x.shape[-1], 1, dtype=torch.float64)
        self.penalised[-1] = 0.0

    def loss_grad(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective ``[S, G]`` and gradient ``[S, G, D + 1, out]``."""
        logits = torch.einsum("snd,sgdo->sgno", self.x, params)
        if self.multinomial:
            logp = torch.log_softmax(logits, -1)
            w = self.w[:, None, :, None]
            loss = -(w * self.y[:, None] * logp).sum((-1, -2))
            delta = w * (logp.exp() - self.y[:, None])
        else:
            w = self.w[:, None]
            loss = (w * (F.softplus(logits) - self.y[:, None] * logits)).sum((-1, -2))
            delta = w * (torch.sigmoid(logits) - self.y[:, None])
        shrunk = params * self.penalised
        loss = loss + 0.5 * self.reg * (shrunk * params).sum((-1, -2))
        grad = torch.einsum("snd,sgno->sgdo", self.x, delta) + self.reg[..., None, None] * shrunk
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
def lbfgs(problems: _Problems, shape: tuple[int, ...], *, tol: float, max_iter: int) -> LinearFit:
    """Minimise every problem from zero weights."""
    s_count, g_count = shape[:2]
    params = torch.zeros(shape, dtype=torch.float64)
    loss, grad = problems.loss_grad(params)
    flat = lambda t: t.reshape(s_count * g_count, -1)  # noqa: E731
    x, g, f = flat(params).clone(), flat(grad).clone(), loss.reshape(-1).clone()
    done = g.abs().amax(1) <= tol
    iterations = torch.zeros(len(x), dtype=torch.long)
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho: list[torch.Tensor] = []
    gamma = torch.ones(len(x), dtype=torch.float64)
    first = True
    for _ in range(max_iter):
        if bool(done.all()):
            break
        d = _directions(g, s_hist, y_hist, rho, gamma)
        slope = (g * d).sum(1)
        steep = slope >= 0  # not a descent direction: restart from the gradient
        d[steep], slope[steep] = -g[steep], -(g[steep] ** 2).sum(1)
        d[done], slope[done] = 0.0, 0.0
        step = torch.full_like(f, 1.0)
        if first:  # no curvature yet: a first step of unit length
            step = 1.0 / g.norm(dim=1).clamp_min(1.0)
            first = False
        accepted = done.clone()
        x_new, g_new, f_new = x.clone(), g.clone(), f.clone()
        for _ in range(MAX_HALVINGS):
            trial = x + step[:, None] * d
            loss_t, grad_t = problems.loss_grad(trial.view(shape))
            loss_t, grad_t = loss_t.reshape(-1), flat(grad_t)
            ok = ~accepted & (loss_t <= f + ARMIJO * step * slope)
            x_new[ok], g_new[ok], f_new[ok] = trial[ok], grad_t[ok], loss_t[ok]
            accepted |= ok
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step / 2)
        stalled = ~accepted  # no decrease at any step: at the float64 floor of its objective
        s_new, y_new = x_new - x, g_new - g
        sy = (s_new * y_new).sum(1)
        useful = sy > 1e-12 * (y_new * y_new).sum(1).clamp_min(1e-300)
        s_hist.append(s_new)
        y_hist.append(y_new)
        rho.append(torch.where(useful, 1.0 / sy.where(useful, torch.ones_like(sy)), torch.zeros_like(sy)))
        gamma = torch.where(useful, sy / (y_new * y_new).sum(1).clamp_min(1e-300), gamma)
        if len(s_hist) > HISTORY:
            s_hist.pop(0), y_hist.pop(0), rho.pop(0)
        iterations += (~done).long()
        x, g, f = x_new, g_new, f_new
        done = done | stalled | (g.abs().amax(1) <= tol)
    converged = g.abs().amax(1) <= tol
    return LinearFit(x.view(shape), converged.view(s_count, g_count).numpy(),
                     iterations.view(s_count, g_count).numpy())  # fmt: skip


def fit_logistic(x_train: torch.Tensor, targets: torch.Tensor, subsets: Sequence[np.ndarray], cs: Sequence[float], *,
                 multinomial: bool, weights: Sequence[np.ndarray] | None = None, tol: float = 1e-6,
                 max_iter: int = 1000) -> LinearFit:  # fmt: skip
    """Logistic regression of every subset at every C. ``targets [n_train, out]``: one-hot classes (multinomial)
    or 0/1 labels; ``weights``: per subset, its rows' sample weights ``[n]`` (multinomial) or element weights
    ``[n, out]`` (scikit-learn's ``class_weight``); none: unweighted."""
    rows, mask = padded(subsets)
    x = x_train.double()[rows]
    shape = (len(subsets), rows.shape[1]) + (() if multinomial else (targets.shape[1],))
    w = torch.zeros(shape, dtype=torch.float64)
    for i, s in enumerate(subsets):
        w[i, : len(s)] = 1.0 if weights is None else torch.as_tensor(weights[i], dtype=torch.float64)
    problems = _Problems(x, targets.double()[rows], w, mask.sum(1).double(), cs, multinomial)
    shape = (len(subsets), len(cs), x.shape[-1] + 1, targets.shape[1])
    return lbfgs(problems, shape, tol=tol, max_iter=max_iter)


def fit_ridge(x_train: torch.Tensor, targets: torch.Tensor, subsets: Sequence[np.ndarray],
              cs: Sequence[float]) -> LinearFit:  # fmt: skip
    """Ridge regression (alpha = 1 / C) of every subset at every C, with an unpenalised intercept."""
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
