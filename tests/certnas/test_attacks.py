"""Attacks stay in the ball and in [0, 1], and find known optima."""
import math

import pytest
import torch
import torch.nn as nn

from certnas.attacks import ATTACKS, PGD


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
def test_adversarial_examples_stay_in_the_ball_and_in_the_unit_box(name, norm):
    torch.manual_seed(1)
    # AutoAttack needs >= 4 classes, and its L2 Square attack images of >= 5 pixels a side
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 5))
    x = torch.rand(16, 1, 6, 6)
    y = torch.randint(0, 5, (16,))
    eps = 0.1 if norm == math.inf else 0.5
    adv = ATTACKS[name](model, eps, norm, steps=5)(x, y)
    distance = (adv - x).flatten(1).norm(p=norm, dim=1)
    assert (distance <= eps + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1


def test_eps_zero_changes_nothing():
    model = _linear()
    x = torch.rand(8, 1, 3, 4)
    assert torch.equal(PGD(model, 0.0, steps=3)(x, torch.zeros(8, dtype=torch.long)), x)


def test_pgd_reaches_the_closed_form_optimum_on_a_linear_model():
    """For a linear two-class margin w.x + b, the worst L-inf point is x - eps sign(w) (inside [0, 1])."""
    model = _linear(2)
    x = 0.3 + 0.4 * torch.rand(4, 1, 3, 4)
    y = torch.zeros(4, dtype=torch.long)
    eps = 0.05
    adv = PGD(model, eps, steps=20, loss="cw", random_start=False)(x, y)
    weight = model[1].weight
    logits = model(adv)
    with torch.no_grad():
        margins = []
        for i in range(4):
            best = math.inf
            for j in (1, 2):
                w = (weight[0] - weight[j]).view(1, 3, 4)
                worst = x[i] - eps * w.sign()
                out = model(worst.unsqueeze(0))[0]
                best = min(best, (out[0] - out[j]).item())
            margins.append(best)
    found = (logits[:, 0] - logits[:, 1:].max(dim=1).values).tolist()
    for got, exact in zip(found, margins):
        assert got == pytest.approx(exact, abs=1e-4)


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
def test_seeded_random_starts_do_not_depend_on_the_batch(norm):
    # one step, no gradient signal to speak of: the random start decides the result
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 5))
    x, y = torch.rand(6, 1, 6, 6), torch.randint(0, 5, (6,))
    eps = 0.1 if norm == math.inf else 0.5
    attack = PGD(model, eps, norm, steps=1, step_size=1e-9, restarts=2, seed=3)
    whole = attack(x, y)
    torch.manual_seed(99)  # the global generator plays no part
    assert torch.allclose(whole[2:5], attack(x[2:5], y[2:5]), atol=1e-6)
    assert torch.allclose(whole[[5, 0]], attack(x[[5, 0]], y[[5, 0]]), atol=1e-6)
    assert not torch.allclose(whole, PGD(model, eps, norm, steps=1, step_size=1e-9, restarts=2, seed=4)(x, y))
    assert ((whole - x).flatten(1).norm(p=norm, dim=1) <= eps + 1e-6).all()


def test_a_batch_size_attacks_in_chunks_with_the_result_of_one_batch():
    """Per-sample eps and seeds: chunks of 3 give what one batch of 8 gives (float64), and no forward pass
    sees more than 3 samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 5)).double()
    widest = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            widest.append(x.shape[0])
            return self.inner(x)

    x, y = torch.rand(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    eps = torch.linspace(0.02, 0.2, 8, dtype=torch.float64)
    whole = PGD(model, eps, steps=5, restarts=2, seed=1)(x, y)
    chunked = PGD(Counting(), eps, steps=5, restarts=2, seed=1, batch_size=3)(x, y)
    assert max(widest) == 3 and torch.allclose(whole, chunked, atol=1e-12)
    assert ((chunked - x).abs().flatten(1).max(1).values <= eps + 1e-12).all()
