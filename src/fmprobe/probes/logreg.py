"""L2-regularised logistic regression solved to convergence by L-BFGS, for many labelled subsets and many C at once;
ridge regression in closed form for regression targets.

The objective of every problem is scikit-learn's ``LogisticRegression(solver="lbfgs")``: C times the (sample
weighted) sum of log losses plus half the squared norm of the weights, the intercept unpenalised; multinomial for
multiclass, one sigmoid per label for binary and multilabel (independent problems: one-vs-rest). It is minimised
divided by C x the number of labelled rows (the same minimum), in float64, by a batched L-BFGS: each (subset, C) problem
keeps its own curvature history and its own backtracking (Armijo) line search, and stops when its gradient's
largest entry is below ``tol``. A step evaluates every subset at every C in two batched matrix products (the C
share each pass over a subset's rows), and subsets whose problems have all finished leave the batch. With fewer
labelled rows than features a problem is solved in the span of its rows. The result equals scikit-learn's to the
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
    """Loss and gradient of a subset at every C, for S subsets: parameters ``W [S, G, D + 1, out]``. The C share
    one pass over each subset's rows (one batched product with G x out columns)."""

    def __init__(self, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, reg: torch.Tensor,
                 multinomial: bool):  # fmt: skip
        self.x, self.y, self.w = x, targets, weights  # [S, n, D + 1] (last column 1), [S, n, out], [S, n(, out)]
        self.reg, self.multinomial = reg, multinomial  # [S, G]: 1 / (C x labelled rows)
        self.penalised = torch.ones(x.shape[-1], 1, dtype=torch.float64)
        self.penalised[-1] = 0.0  # the intercept

    def take(self, index: torch.Tensor) -> _Problems:
        return _Problems(self.x[index], self.y[index], self.w[index], self.reg[index], self.multinomial)

    def loss_grad(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective ``[S, G]`` and gradient ``[S, G, D + 1, out]``."""
        s, g, d, o = params.shape
        logits = torch.bmm(self.x, params.permute(0, 2, 1, 3).reshape(s, d, g * o)).view(s, -1, g, o)
        y = self.y[:, :, None]
        if self.multinomial:
            logp = torch.log_softmax(logits, -1)
            w = self.w[:, :, None, None]
            loss = -(w * y * logp).sum((1, 3))
            delta = w * (logp.exp() - y)
        else:
            w = self.w[:, :, None]
            loss = (w * (F.softplus(logits) - y * logits)).sum((1, 3))
            delta = w * (torch.sigmoid(logits) - y)
        shrunk = params * self.penalised
        loss = loss + 0.5 * self.reg * (shrunk * params).sum((-1, -2))
        grad = torch.bmm(self.x.transpose(1, 2), delta.reshape(s, -1, g * o)).view(s, d, g, o).permute(0, 2, 1, 3)
        return loss, grad + self.reg[..., None, None] * shrunk


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
    """Minimise every (subset, C) problem of ``shape [S, G, D + 1, out]`` from zero weights. The subsets whose
    problems have all finished leave the batch once a quarter of it has (no work on them after)."""
    s_count, g_count = shape[:2]
    width = int(np.prod(shape[2:]))
    rows = lambda t: t.reshape(-1, width)
    weights = torch.zeros(shape, dtype=torch.float64)
    converged = np.zeros((s_count, g_count), dtype=bool)
    iterations = np.zeros((s_count, g_count), dtype=np.int64)
    active = torch.arange(s_count)
    loss, grad = problems.loss_grad(weights)
    x, g, f = rows(weights).clone(), rows(grad), loss.reshape(-1)
    done = g.abs().amax(1) <= tol
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho: list[torch.Tensor] = []
    gamma = 1.0 / g.norm(dim=1).clamp_min(1.0)  # no curvature yet: a first step of unit length

    def leave(keep: torch.Tensor) -> None:  # write the finished subsets out; continue with ``keep`` ([S] bool)
        nonlocal problems, active, x, g, f, done, gamma, s_hist, y_hist, rho
        gone, keep_rows = ~keep, keep.repeat_interleave(g_count)
        weights[active[gone]] = x.view(-1, *shape[1:])[gone]
        converged[active[gone].numpy()] = (g.abs().amax(1) <= tol).view(-1, g_count)[gone].numpy()
        problems, active = problems.take(keep), active[keep]
        x, g, f, done, gamma = x[keep_rows], g[keep_rows], f[keep_rows], done[keep_rows], gamma[keep_rows]
        s_hist, y_hist, rho = [t[keep_rows] for t in s_hist], [t[keep_rows] for t in y_hist], [t[keep_rows] for t in rho]

    for _ in range(max_iter):
        if bool(done.all()):
            break
        finished = done.view(-1, g_count).all(1)
        if 4 * int(finished.sum()) >= len(finished):
            leave(~finished)
        d = _directions(g, s_hist, y_hist, rho, gamma)
        slope = (g * d).sum(1)
        steep = slope >= 0  # not a descent direction: restart from the gradient
        d[steep], slope[steep] = -g[steep], -(g[steep] ** 2).sum(1)
        d[done], slope[done] = 0.0, 0.0
        step = torch.ones_like(f)
        accepted = done.clone()
        x_new, g_new, f_new = x.clone(), g.clone(), f.clone()
        batch, subset_rows = problems, torch.arange(len(f))  # the first trial: every subset
        for _ in range(MAX_HALVINGS):
            trial = x[subset_rows] + step[subset_rows, None] * d[subset_rows]
            loss_t, grad_t = batch.loss_grad(trial.view(-1, *shape[1:]))
            loss_t, grad_t = loss_t.reshape(-1), rows(grad_t)
            ok = ~accepted[subset_rows] & (loss_t <= f[subset_rows] + ARMIJO * step[subset_rows] * slope[subset_rows])
            update = subset_rows[ok]
            x_new[update], g_new[update], f_new[update] = trial[ok], grad_t[ok], loss_t[ok]
            accepted[update] = True
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step / 2)
            retry = (~accepted).view(-1, g_count).any(1).nonzero().squeeze(1)  # only the subsets still searching
            batch = problems.take(retry)
            subset_rows = (retry[:, None] * g_count + torch.arange(g_count)).reshape(-1)
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
        iterations[active.numpy()] += (~done).view(-1, g_count).numpy()
        x, g, f = x_new, g_new, f_new
        done = done | stalled | (g.abs().amax(1) <= tol)
    leave(torch.zeros(len(active), dtype=torch.bool))
    return LinearFit(weights, converged, iterations)


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
        q, r = torch.linalg.qr(x.transpose(1, 2))  # x^T = QR: Q's n columns span the rows
        basis, x = q.transpose(1, 2), r.transpose(1, 2)  # [S, n, D] orthonormal rows; coordinates x Q = R^T
    x = F.pad(x, (0, 1), value=1.0)  # the intercept's column
    count = mask.sum(1).double()
    w = w / count.view(-1, *[1] * (w.ndim - 1))  # sample (element) weights over labelled rows
    reg = 1.0 / (torch.as_tensor(cs, dtype=torch.float64)[None, :] * count[:, None])
    problems = _Problems(x, targets.double()[rows], w, reg, multinomial)
    fit = lbfgs(problems, (len(subsets), len(cs), x.shape[-1], targets.shape[1]), tol=tol, max_iter=max_iter)
    if basis is not None:
        coefs = torch.einsum("snd,sgno->sgdo", basis, fit.weights[:, :, :-1])
        fit.weights = torch.cat([coefs, fit.weights[:, :, -1:]], dim=2)
    return fit


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
