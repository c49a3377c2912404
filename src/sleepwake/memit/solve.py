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


def through_post_norm(
    norm: torch.nn.Module, out: torch.Tensor, resid: torch.Tensor, penalty: float = 1e-3, max_iter: int = 200
) -> torch.Tensor:
    """The change Δ of the down-projection output `out` (N×d) that moves `norm(out)` by `resid`.

    Where a norm sits between the MLP and the residual stream (Gemma 2/3), a residual
    change r is not a down-projection change r: Gemma-3-270M's MLP outputs have norm ~3
    while the norm's gains (1 + w) range from 0 to ~600, so writing r directly
    overshoots by orders of magnitude. Solves, per row, with L-BFGS,

        min_Δ ‖norm(out + Δ) − (norm(out) + r)‖² / ‖norm(out) + r‖² + penalty · ‖Δ‖² / ‖out‖²

    (the norm is scale invariant, so the small penalty picks the smallest Δ).
    """
    out = out.detach().float()
    resid = resid.detach().float()
    with torch.no_grad():
        want = norm(out).float() + resid
    want_sq = want.pow(2).sum(-1).clamp_min(1e-12)
    out_sq = out.pow(2).sum(-1).clamp_min(1e-12)
    delta = torch.zeros_like(out, requires_grad=True)
    opt = torch.optim.LBFGS([delta], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        got = norm(out + delta).float()
        loss = ((got - want).pow(2).sum(-1) / want_sq).sum() + penalty * (delta.pow(2).sum(-1) / out_sq).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return delta.detach()
