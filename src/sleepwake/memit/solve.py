"""The closed-form update (paper eq. 3–5), kept in N×N space by Woodbury (eq. 4).

    ΔW = R Kᵀ (λĈ + K Kᵀ)⁻¹ = R (I + Kᵀ Q)⁻¹ Qᵀ,   Q = (λĈ)⁻¹ K

(push-through identity), so only Ĉ⁻¹ (once per layer) and an N×N solve are needed.
With earlier edits' keys appended with zero residual (eq. 5), ΔW = R_new · B where
B is the first N_new rows of (I + M)⁻¹ Qᵀ: the update has rank ≤ N_new and is
stored as the two factors R_new (d_out × N_new) and B (N_new × d_in).
"""

from __future__ import annotations

import torch


def inverse_covariance(cov: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Ĉ⁻¹ in float64. A tiny ridge (relative to the mean eigenvalue) keeps rare
    directions from blowing up when Ĉ is estimated from few tokens."""
    c = cov.double()
    d = c.shape[0]
    c = c + ridge * (torch.trace(c) / d) * torch.eye(d, dtype=c.dtype, device=c.device)
    chol = torch.linalg.cholesky(c)
    return torch.cholesky_inverse(chol)


def solve_update(
    resid: torch.Tensor,
    keys: torch.Tensor,
    cov_inv: torch.Tensor,
    lam: float,
    prev_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A, B) with ΔW = A @ B for new keys (N×d_in), residuals (N×d_out).

    prev_keys (P×d_in): keys of earlier active edits, held at zero residual.
    """
    k = keys.double()
    if prev_keys is not None and prev_keys.shape[0]:
        k = torch.cat([k, prev_keys.double()])
    n_new = keys.shape[0]
    q = (cov_inv @ k.T) / lam  # d_in × N
    m = k @ q  # N × N
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    b = torch.linalg.solve(eye + m, q.T)[:n_new]  # N_new × d_in
    return resid.T.float().contiguous(), b.float().contiguous()


def direct_update(
    resid: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, lam: float, prev_keys: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference d×d solve of eq. 3 (for tests): R Kᵀ (λĈ + K Kᵀ)⁻¹."""
    k = keys.double()
    r = resid.double()
    if prev_keys is not None and prev_keys.shape[0]:
        k = torch.cat([k, prev_keys.double()])
        r = torch.cat([r, torch.zeros(prev_keys.shape[0], r.shape[1], dtype=r.dtype, device=r.device)])
    a = lam * cov.double() + k.T @ k
    return torch.linalg.solve(a, k.T @ r).T  # (d_out × d_in), A symmetric
