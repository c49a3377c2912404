"""The maths of the update: Woodbury (eq. 4) equals the direct d×d solve of eq. 3,
cross-edit constraints (eq. 5) keep earlier keys' outputs, factors round-trip."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from sleepwake.memit.editor import FactEdit
from sleepwake.memit.solve import direct_update, inverse_covariance, solve_update


def _problem(d_in=48, d_out=24, n=5, p=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d_in, dtype=torch.float64)
    cov = x.T @ x / x.shape[0]
    keys = torch.randn(n, d_in, generator=g, dtype=torch.float64) * 2
    resid = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    prev = torch.randn(p, d_in, generator=g, dtype=torch.float64) * 2
    return cov, keys, resid, prev


def test_woodbury_equals_direct_solve():
    cov, keys, resid, _ = _problem()
    for lam in (0.01, 0.1, 10.0):
        a, b = solve_update(resid, keys, inverse_covariance(cov, ridge=0.0), lam)
        direct = direct_update(resid, keys, cov, lam)
        assert torch.allclose((a.double() @ b.double()), direct, rtol=1e-4, atol=1e-5)


def test_woodbury_with_previous_keys_equals_direct_solve():
    cov, keys, resid, prev = _problem()
    a, b = solve_update(resid, keys, inverse_covariance(cov, ridge=0.0), 0.1, prev)
    direct = direct_update(resid, keys, cov, 0.1, prev)
    assert a.shape == (resid.shape[1], keys.shape[0])  # rank ≤ number of new keys
    assert b.shape == (keys.shape[0], cov.shape[0])
    assert torch.allclose(a.double() @ b.double(), direct, rtol=1e-4, atol=1e-5)


def test_constraint_keeps_earlier_outputs_and_writes_new_ones():
    cov, keys, resid, prev = _problem(d_in=64, n=4, p=10)
    lam = 1e-3  # small λ: the solve nearly interpolates
    a, b = solve_update(resid, keys, inverse_covariance(cov, ridge=0.0), lam, prev)
    delta = a.double() @ b.double()
    # Earlier keys: outputs unchanged (zero residual), relative to the size of the edit.
    assert (delta @ prev.T).abs().max() < 1e-3 * resid.abs().max()
    # New keys: the residual is written.
    assert torch.allclose(delta @ keys.T, resid.T, atol=1e-2 * resid.abs().max())
    # Without the constraint the earlier keys' outputs do move.
    a2, b2 = solve_update(resid, keys, inverse_covariance(cov, ridge=0.0), lam)
    assert ((a2.double() @ b2.double()) @ prev.T).abs().max() > 1e-2 * resid.abs().max()


def test_factor_storage_round_trips(tmp_path):
    g = torch.Generator().manual_seed(1)
    e = FactEdit()
    for layer in (3, 7):
        e.a[layer] = torch.randn(6, 2, generator=g)
        e.b[layer] = torch.randn(2, 9, generator=g)
        e.k[layer] = torch.randn(2, 9, generator=g)
    path = tmp_path / "e.safetensors"
    save_file(e.tensors(), str(path))
    back = FactEdit.from_tensors(load_file(str(path)))
    for layer in (3, 7):
        assert torch.equal(back.a[layer], e.a[layer])
        assert torch.equal(back.b[layer], e.b[layer])
        assert torch.equal(back.k[layer], e.k[layer])


def test_joined_edits_hold_the_sum_of_their_deltas():
    g = torch.Generator().manual_seed(1)
    one, two = FactEdit(), FactEdit()
    for e, n in ((one, 2), (two, 3)):
        for layer in (4, 5):
            e.a[layer], e.b[layer] = torch.randn(16, n, generator=g), torch.randn(n, 8, generator=g)
            e.k[layer] = torch.randn(n, 8, generator=g)
    both = one.joined(two)
    for layer in (4, 5):
        assert torch.allclose(both.a[layer] @ both.b[layer], one.a[layer] @ one.b[layer] + two.a[layer] @ two.b[layer],
                              atol=1e-5)
        assert torch.equal(both.k[layer], torch.cat([one.k[layer], two.k[layer]]))


def test_adapter_round_trips_and_combines_to_the_sum_of_its_parts(tmp_path):
    """An adapter saved as PEFT files loads back bitwise; side by side, adapters (and
    MEMIT factors taken over as one) add up to the sum of their deltas."""
    from sleepwake.sleep.lora import Adapter, combine, from_factors

    g = torch.Generator().manual_seed(2)
    one = Adapter({"m.x": torch.randn(4, 9, generator=g)}, {"m.x": torch.randn(6, 4, generator=g)}, 4, 8.0)
    two = from_factors({"m.x": (torch.randn(6, 3, generator=g), torch.randn(3, 9, generator=g)),
                        "m.y": (torch.randn(5, 3, generator=g), torch.randn(3, 2, generator=g))})
    one.save(tmp_path / "a", "base")
    back = Adapter.load(tmp_path / "a")
    assert back.r == 4 and back.alpha == 8.0 and torch.equal(back.a["m.x"], one.a["m.x"])
    both = combine([back, two])
    delta = {n: l @ r for n, (l, r) in both.factors().items()}
    want_x = 2.0 * one.b["m.x"] @ one.a["m.x"] + two.b["m.x"] @ two.a["m.x"]
    assert torch.allclose(delta["m.x"], want_x, atol=1e-5)
    assert torch.allclose(delta["m.y"], two.b["m.y"] @ two.a["m.y"], atol=1e-6)  # zero columns from `one`
    assert both.r == 7 and both.scale == 1.0
