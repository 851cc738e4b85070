"""util/lars.py: one and two steps against the MoCo-v3 formula written out by hand (in float64)."""
import pytest
import torch

from util.lars import LARS


def norm(t):
    return float((t.double() ** 2).sum().sqrt())


def hand_step(p, g, mu, lr, wd, momentum=0.9, eta=0.001, adapt=True):
    """The SPEC §4.1 update for one parameter; returns (new p, new momentum buffer)."""
    p, g, mu = p.double(), g.double(), mu.double()
    if adapt:
        g = g + wd * p
        pn, gn = norm(p), norm(g)
        trust = eta * pn / gn if pn > 0 and gn > 0 else 1.0
        g = g * trust
    mu = momentum * mu + g
    return p - lr * mu, mu


def run(p0, grads, lr, wd):
    p = torch.nn.Parameter(p0.clone())
    opt = LARS([p], lr=lr, weight_decay=wd)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize('wd', [0.0, 0.05])
def test_matrix_two_steps_follow_the_formula(wd):
    torch.manual_seed(0)
    p0 = torch.randn(4, 3, dtype=torch.float64)
    grads = [torch.randn(4, 3, dtype=torch.float64) * 5, torch.randn(4, 3, dtype=torch.float64) * 0.1]
    lr = 2.0
    p, mu = p0, torch.zeros_like(p0)
    for g in grads:
        p, mu = hand_step(p, g, mu, lr, wd)
    torch.testing.assert_close(run(p0, grads, lr, wd), p, rtol=1e-12, atol=1e-12)


def test_adapts_at_zero_weight_decay():
    """MAE-priv's LARS skips the trust ratio when wd = 0; here the step is 0.001 * ||p|| / ||g|| of plain SGD's."""
    torch.manual_seed(1)
    p0, g = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    lr = 1.0
    step = p0 - run(p0, [g], lr, wd=0.0)
    torch.testing.assert_close(step, lr * 0.001 * norm(p0) / norm(g) * g, rtol=1e-12, atol=1e-12)
    assert norm(step) == pytest.approx(lr * 0.001 * norm(p0))  # the relative step size LARS is about
    assert norm(step) < 0.01 * norm(lr * g)  # far from the unadapted step


def test_one_dim_params_get_plain_momentum_without_decay():
    torch.manual_seed(2)
    b0 = torch.randn(6, dtype=torch.float64)
    grads = [torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)]
    lr, wd = 0.5, 0.1
    b, mu = b0, torch.zeros_like(b0)
    for g in grads:
        b, mu = hand_step(b, g, mu, lr, wd, adapt=False)
    torch.testing.assert_close(run(b0, grads, lr, wd), b, rtol=1e-12, atol=1e-12)
    # and concretely: first step is exactly -lr * g (no 0.001 factor, no decay)
    torch.testing.assert_close(run(b0, grads[:1], lr, wd), b0 - lr * grads[0], rtol=1e-12, atol=1e-12)


def test_zero_weight_matrix_uses_trust_one():
    g = torch.full((2, 3), 0.5, dtype=torch.float64)
    torch.testing.assert_close(run(torch.zeros(2, 3, dtype=torch.float64), [g], 0.1, 0.0), -0.1 * g)


def test_mixed_groups_and_state_round_trip():
    """A weight and a bias in one optimizer: each gets its own rule; the momentum survives state_dict()."""
    torch.manual_seed(3)
    w0, b0 = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    gw, gb = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = LARS([w, b], lr=1.0, weight_decay=0.0)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    opt2 = LARS([w, b], lr=1.0, weight_decay=0.0)
    opt2.load_state_dict(opt.state_dict())
    w.grad, b.grad = gw.clone(), gb.clone()
    opt2.step()
    ew, muw = hand_step(w0, gw, torch.zeros_like(w0), 1.0, 0.0)
    ew, _ = hand_step(ew, gw, muw, 1.0, 0.0)
    eb, mub = hand_step(b0, gb, torch.zeros_like(b0), 1.0, 0.0, adapt=False)
    eb, _ = hand_step(eb, gb, mub, 1.0, 0.0, adapt=False)
    torch.testing.assert_close(w.detach(), ew, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), eb, rtol=1e-12, atol=1e-12)
