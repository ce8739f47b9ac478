"""Intervention math on random tensors, no model."""

import pytest
import torch

from steerkit.directions import Direction
from steerkit.errors import SteerkitError
from steerkit.interventions import Intervention, SteeringPlan, ablate_latents, ablate_vector, add, clamp_latents, clamp_vector


def unit(d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    return v / v.norm()


def direction(d=16, **kw):
    base = dict(name="t", vector=unit(d), model="m", layer=1, hook_name="blocks.1.hook_out", kind="vector", median_norm=10.0)
    base.update(kw)
    return Direction(**base)


def test_add_scalar_and_per_row():
    x = torch.randn(3, 5, 16)
    u = unit()
    assert torch.allclose(add(x, u, 2.0), x + 2 * u)
    c = torch.tensor([0.0, 1.0, -3.0])
    y = add(x, u, c)
    for b in range(3):
        assert torch.allclose(y[b], x[b] + c[b] * u)


def test_add_zero_is_bitwise_identity():
    x = torch.randn(2, 7, 16)
    assert torch.equal(add(x, unit(), 0.0), x)
    assert torch.equal(add(x, unit(), torch.zeros(2)), x)


def test_mask_leaves_other_positions_untouched():
    x = torch.randn(2, 4, 16)
    mask = torch.tensor([[False, True, True, False], [True, False, False, True]])
    y = add(x, unit(), 5.0, mask)
    assert torch.equal(y[~mask], x[~mask])
    assert not torch.allclose(y[mask], x[mask])


def test_clamp_sets_component_and_keeps_orthogonal_part():
    x = torch.randn(2, 3, 16)
    u = unit()
    y = clamp_vector(x, u, 4.0)
    assert torch.allclose(y @ u, torch.full((2, 3), 4.0), atol=1e-5)
    orth = lambda t: t - (t @ u)[..., None] * u
    assert torch.allclose(orth(y), orth(x), atol=1e-5)


def test_ablate_removes_component():
    x = torch.randn(4, 3, 16)
    u = unit()
    y = ablate_vector(x, u)
    assert torch.allclose(y @ u, torch.zeros(4, 3), atol=1e-5)
    assert torch.allclose(ablate_vector(y, u), y, atol=1e-6)  # idempotent


class ToySAE:
    """ReLU SAE with random weights: enough to check the error term is kept."""

    def __init__(self, d=16, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d, n, generator=g) / 4
        self.b_enc = torch.zeros(n)
        self.W_dec = torch.randn(n, d, generator=g) / 4
        self.b_dec = torch.zeros(d)

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, a):
        return a @ self.W_dec + self.b_dec


def test_clamp_latents_keeps_reconstruction_error():
    sae = ToySAE()
    x = torch.randn(2, 5, 16)
    y = clamp_latents(x, sae, [3, 7], 2.5)
    # by hand: x + sum_i (v - a_i) W_dec[i]
    a = sae.encode(x)
    want = x + (2.5 - a[..., 3])[..., None] * sae.W_dec[3] + (2.5 - a[..., 7])[..., None] * sae.W_dec[7]
    assert torch.allclose(y, want, atol=1e-5)
    err_before = x - sae.decode(sae.encode(x))
    # the error term relative to the edited reconstruction is unchanged
    a2 = a.clone()
    a2[..., [3, 7]] = 2.5
    assert torch.allclose(y - sae.decode(a2), err_before, atol=1e-5)


def test_ablate_latents_is_clamp_zero():
    sae = ToySAE()
    x = torch.randn(2, 5, 16)
    assert torch.allclose(ablate_latents(x, sae, [1]), clamp_latents(x, sae, [1], 0.0))


def test_intervention_units_and_validation():
    d = direction()
    assert Intervention(d, "add", 0.3).coefficient() == pytest.approx(3.0)
    assert Intervention(d, "add", 0.3, raw=True).coefficient() == pytest.approx(0.3)
    with pytest.raises(SteerkitError, match="finite"):
        Intervention(d, "add", float("nan"))
    with pytest.raises(SteerkitError, match="not one of"):
        Intervention(d, "scale", 1.0)  # type: ignore[arg-type]


def test_direction_rejects_bad_vectors():
    with pytest.raises(SteerkitError, match="NaN"):
        direction(vector=torch.tensor([1.0, float("nan")]))
    with pytest.raises(SteerkitError, match="zeros"):
        direction(vector=torch.zeros(4))
    d = direction(vector=torch.tensor([3.0, 4.0]))
    assert torch.allclose(d.vector, torch.tensor([0.6, 0.8]))  # normalised


def test_plan_rows_with_different_strengths_match_separate_application():
    d = direction()
    rows = [[Intervention(d, "add", s)] for s in (0.0, 0.5, -1.0)] + [[]]
    plan = SteeringPlan.build(rows)
    x = torch.randn(4, 3, 16)
    y = plan.apply(1, x, None)
    for b, s in enumerate((0.0, 0.5, -1.0, 0.0)):
        assert torch.allclose(y[b], x[b] + s * 10.0 * d.vector, atol=1e-6)
    assert torch.equal(y[0], x[0]) and torch.equal(y[3], x[3])


def test_plan_clamp_row_without_clamp_is_untouched():
    d = direction()
    plan = SteeringPlan.build([[Intervention(d, "clamp", 1.0)], []])
    x = torch.randn(2, 3, 16)
    y = plan.apply(1, x, None)
    assert torch.equal(y[1], x[1])
    assert torch.allclose(y[0] @ d.vector, torch.full((3,), 10.0), atol=1e-4)


def test_plan_other_layer_untouched_and_keep_rows():
    d = direction()
    plan = SteeringPlan.build([[Intervention(d, "add", 1.0)], [Intervention(d, "add", 2.0)]])
    x = torch.randn(2, 3, 16)
    assert torch.equal(plan.apply(0, x, None), x)
    plan.keep_rows(torch.tensor([1]))
    y = plan.apply(1, x[1:], None)
    assert torch.allclose(y[0], x[1] + 20.0 * d.vector, atol=1e-5)
