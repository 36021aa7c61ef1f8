"""Closed-form weight updates for locate-then-edit methods (float64, Cholesky/solve, never an inverse).

Notation (all in the [out, in] orientation of ``W``): keys ``K`` [in, n], target residuals ``R`` [out, n]
(desired change of the outputs for those keys), ``C`` [in, in] = E[k k^T] of the preserved keys.

* ``rank_one``    ROME:      Delta = (v - W k) u^T / (u^T k),  u = C^-1 k          =>  (W + Delta) k = v
* ``rank_one_on_keys``     Delta = delta u^T,  u = C^-1 K (K^T C^-1 K + r I)^-1 1   =>  Delta k_t ~ delta for every k_t
* ``least_squares`` MEMIT:   Delta = R K^T (lam C + K K^T)^-1                        (min |Delta K - R|^2 + lam tr(Delta C Delta^T))
* ``null_space_projector`` + ``projected_least_squares`` AlphaEdit:
  P projects onto the null space of C; Delta^T = (P (Kp Kp^T + K K^T) + a I)^-1 P K R^T, so Delta C ~ 0
* ``equality_constrained`` EMMET: min tr(Delta C Delta^T) s.t. (W + Delta) K = W K + R
  =>  Delta = R (K^T C^-1 K)^-1 K^T C^-1

Every function casts its inputs to float64 (or ``dtype``) and returns float32 (or as asked).
"""

from __future__ import annotations

import torch

from lmedit.errors import EditFailedError


def _ridge(a: torch.Tensor, damping: float) -> torch.Tensor:
    """a + damping * mean(diag(a)) * I (damping relative to the matrix's scale)."""
    if damping <= 0:
        return a
    scale = a.diagonal().mean().abs().clamp_min(1e-30)
    return a + damping * scale * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)


def spd_solve(a: torch.Tensor, b: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """Solve a x = b for a symmetric positive (semi-)definite ``a`` by Cholesky, adding damping if needed.

    Args:
        a: [d, d] symmetric PSD.
        b: [d, m] or [d].
        damping: relative ridge added before factorising; raised x10 (up to 1e-2) until Cholesky succeeds.
    """
    a = (a + a.T) / 2
    eps = damping
    while True:
        chol, info = torch.linalg.cholesky_ex(_ridge(a, eps))
        if int(info) == 0:
            break
        eps = 1e-10 if eps == 0 else eps * 10
        if eps > 1e-2:
            raise EditFailedError(
                "the key covariance is not positive definite even with damping 1e-2: compute statistics over "
                "more tokens (n_tokens) or raise the method's damping"
            )
    vec = b.dim() == 1
    x = torch.cholesky_solve(b[:, None] if vec else b, chol)
    return x[:, 0] if vec else x


def rank_one(
    w: torch.Tensor, c: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_fix: torch.Tensor | None = None,
    damping: float = 0.0, dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """ROME's rank-one update: returns (left [out], right [in]) with Delta = left right^T.

    Args:
        w: [out, in] current weight.
        c: [in, in] key second moment E[k k^T].
        k: [in] the key whose direction the update takes (u = C^-1 k).
        v: [out] the value the edited weight must produce for ``k_fix``.
        k_fix: [in] the key for which (W + Delta) k_fix = v holds exactly (default ``k``: the corrected r-ROME
            update; the original ROME code used the plain prompt's key here).
        damping: relative ridge on C.
    """
    w, c, k, v = (t.to(dtype) for t in (w, c, k, v))
    k_fix = k if k_fix is None else k_fix.to(dtype)
    u = spd_solve(c, k, damping)  # [in]  C^-1 k
    denom = u @ k_fix
    if denom.abs() < 1e-12:
        raise EditFailedError("rank-one update is degenerate: (C^-1 k)^T k ~ 0; check the key statistics")
    left = (v - w @ k_fix) / denom  # [out]
    return left.float(), u.float()


def rank_one_on_keys(
    c: torch.Tensor, keys: torch.Tensor, delta: torch.Tensor, damping: float = 0.0, ridge: float = 1e-2,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The rank-one update that adds ``delta`` to the output of every key in ``keys``, moving others least.

    ROME's update is exact for one key; a subject's key varies with the context before it (on Gemma 3 270M a
    single-token subject at the start of a prompt has a key whose overlap (C^-1 k*)^T k / (C^-1 k*)^T k* with
    the template-averaged key k* is 0.2-0.6, so ROME realises only that fraction of the value there). Here
    Delta = delta u^T with u of least C-norm (least expected change ``E|Delta k|^2 = |delta|^2 u^T C u`` over
    the corpus's keys) subject to ``u^T k_t = 1`` for every key: ``u = C^-1 K (K^T C^-1 K + r I)^-1 1``, the
    constraints softened by the relative ridge ``r`` (times the mean diagonal of ``K^T C^-1 K``) because
    the keys are nearly collinear.

    Args:
        c: [in, in] key second moment.
        keys: [n, in] the keys (a subject under each context template).
        delta: [out] the change of output wanted at each of them.
        damping: relative ridge on C; ridge: relative ridge on the constraints (0: exact).
    Returns:
        (left [out], right [in]) float32, Delta = left right^T.
    """
    c, keys, delta = (t.to(dtype) for t in (c, keys, delta))
    ci_k = spd_solve(c, keys.T, damping)  # [in, n]
    gram = keys @ ci_k  # [n, n]
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(len(keys), dtype=dtype, device=gram.device)
    coef = torch.linalg.solve(gram, torch.ones(len(keys), dtype=dtype, device=gram.device))  # [n]
    return delta.float(), (ci_k @ coef).float()


def least_squares(
    k: torch.Tensor, r: torch.Tensor, c: torch.Tensor, lam: float, damping: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:  # fmt: skip
    """MEMIT's update Delta = R K^T (lam C + K K^T)^-1, [out, in] float32.

    Args:
        k: [in, n] keys of the edits. r: [out, n] residuals. c: [in, in] E[k k^T] of preserved keys.
        lam: weight of the preservation term (MEMIT's ``mom2_update_weight``).
    """
    k, r, c = (t.to(dtype) for t in (k, r, c))
    a = lam * c + k @ k.T  # [in, in]
    x = spd_solve(a, k, damping)  # [in, n] = A^-1 K
    return (r @ x.T).float()  # [out, in]


def null_space_projector(
    c: torch.Tensor,
    threshold: float = 1e-2,
    relative: bool = True,
    energy: float | None = None,
    mean_cap: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, float]:
    """P [in, in] projecting onto the span of C's eigenvectors with small eigenvalues (AlphaEdit), and the share
    of the preserved keys' energy E|k|^2 = tr C that lies in that span (E|P k|^2 / E|k|^2: how far the update
    can still reach the preserved keys).

    An eigenvalue counts as small when it is below ``threshold`` times the largest one (``relative=True``), or
    below ``threshold`` itself (``relative=False``: the paper's absolute rule, which depends on the model's
    activation scale). With ``energy`` the smallest eigenvalues whose sum stays within that share of tr C are
    taken instead (a bound on the preserved keys' reach, whatever the spectrum's shape). With ``mean_cap`` a
    threshold-rule eigenvalue must also be below ``mean_cap`` times the mean eigenvalue tr C / d: a direction
    with about the average variance is not one the preserved keys hardly use, however large the largest
    eigenvalue (outlier directions put 1e-2 of the largest at 2-4x the mean on Gemma 3 270M).
    """
    c = c.to(dtype)
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)  # ascending
    evals = evals.clamp_min(0)
    if energy is not None:
        small = evals.cumsum(0) <= energy * evals.sum()
    else:
        small = evals < (threshold * evals[-1] if relative else threshold)
        if mean_cap is not None:
            small &= evals < mean_cap * evals.mean()
    basis = evecs[:, small]  # [in, r]
    return basis @ basis.T, float(evals[small].sum() / evals.sum().clamp_min(1e-300))


def projected_least_squares(
    k: torch.Tensor, r: torch.Tensor, p: torch.Tensor, kp_kpt: torch.Tensor | None = None, l2: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:  # fmt: skip
    """AlphaEdit's update, [out, in]: Delta^T = (P (Kp Kp^T + K K^T) + l2 I)^-1 P K R^T.

    The solution lies in the range of ``p``, so Delta x = 0 for every x that ``p`` annihilates (the preserved
    keys). ``kp_kpt`` [in, in] is the sum of outer products of keys edited in earlier steps (sequential state).
    """
    k, r, p = (t.to(dtype) for t in (k, r, p))
    a = k @ k.T  # [in, in]
    if kp_kpt is not None:
        a = a + kp_kpt.to(dtype)
    lhs = p @ a + l2 * torch.eye(a.shape[0], dtype=dtype, device=a.device)
    rhs = p @ k @ r.T  # [in, out]
    x = torch.linalg.solve(lhs, rhs)  # [in, out]
    return x.T.float()


def equality_constrained(
    k: torch.Tensor, r: torch.Tensor, c: torch.Tensor, damping: float = 1e-6, gram_damping: float = 1e-4,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:  # fmt: skip
    """EMMET's update, [out, in]: Delta = R (K^T C^-1 K + g I)^-1 K^T C^-1.

    With ``gram_damping`` g = 0 the constraints Delta K = R hold exactly; a small g (relative to the Gram
    matrix's scale) keeps near-duplicate keys from blowing the update up.
    """
    k, r, c = (t.to(dtype) for t in (k, r, c))
    c_inv_k = spd_solve(c, k, damping)  # [in, n]
    gram = k.T @ c_inv_k  # [n, n]
    y = spd_solve(gram, r.T, gram_damping)  # [n, out]
    return (y.T @ c_inv_k.T).float()  # [out, in]
