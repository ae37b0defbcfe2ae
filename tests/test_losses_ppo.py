"""PPO losses and estimators against hand-computed numbers and plain-loop references."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from rlhf.losses import (
    entropy_from_logits,
    explained_variance,
    gae,
    kl_exact,
    kl_k1,
    kl_k3,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    value_loss,
)


def gae_loop(rewards, values, mask, gamma, lam):
    """The textbook backwards loop, one row and one real token at a time."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_hand_numbers():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])  # the 4th column is padding: ignored
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # deltas 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.95*0.3, A0 = 0.1 + 0.95*A1
    expected = torch.tensor([[0.46575, 0.385, 0.3, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_vectorised_equals_loop(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    B, T = 5, 17
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([17, 1, 9, 16, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards, values, mask.double(), gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_rloo_advantages_hand_numbers():
    # two prompts x 3 responses; returns are the row sums over real tokens (the 9.0s sit on padding)
    rewards = torch.tensor(
        [
            [0.0, 1.0, 9.0],  # return 1
            [2.0, 9.0, 9.0],  # 2
            [-0.5, 0.5, 6.0],  # 6
            [0.0, 0.0, 3.0],  # 3
            [0.0, 3.0, 9.0],  # 3
            [0.0, 0.0, 0.0],  # 0
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv, ret = rloo_advantages(rewards, mask, group_size=3)
    # A_i = R_i - mean of the other two: 1 - 4, 2 - 3.5, 6 - 1.5; 3 - 1.5, 3 - 1.5, 0 - 3
    per_response = torch.tensor([-3.0, -1.5, 4.5, 1.5, 1.5, -3.0])
    torch.testing.assert_close(adv, per_response[:, None] * mask)
    torch.testing.assert_close(ret, torch.tensor([1.0, 2, 6, 3, 3, 0])[:, None] * mask)
    # leave-one-out advantages of a group sum to zero: the baseline takes nothing from the mean
    torch.testing.assert_close(per_response.view(2, 3).sum(1), torch.zeros(2))
    with pytest.raises(ValueError, match="groups"):
        rloo_advantages(rewards, mask, group_size=4)
    with pytest.raises(ValueError, match="groups"):
        rloo_advantages(rewards, mask, group_size=1)


def test_masked_whiten_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = masked_whiten(values, mask)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    kept_mean = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(kept_mean, torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6, rtol=0)


def test_policy_loss_hand_numbers_and_gradient():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    # per token: max(-A r, -A clip(r)) = -1.2 (clipped), -0.5, 1.1, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.7) / 4)
    loss.backward()
    # d/dlogp of -A*r is -A*r where unclipped, 0 where the clipped branch is taken
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -0.5, 1.1, 0.0]]) / 4)
    masked, mstats = policy_loss(new.detach(), old, adv, torch.tensor([[1, 1, 1, 0]]), clip=0.2)
    assert masked.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert mstats["clipfrac"].item() == pytest.approx(1 / 3)
    summed, _ = policy_loss(new.detach(), old, adv, mask, clip=0.2, normalizer=8.0)
    assert summed.item() == pytest.approx(0.2 / 8)


def test_approx_kl_is_k3_of_old_and_new():
    old = torch.log(torch.tensor([[0.5, 0.25]]))
    new = torch.log(torch.tensor([[0.25, 0.25]]))
    _, stats = policy_loss(new, old, torch.zeros(1, 2), torch.ones(1, 2), clip=0.2)
    # token 0: ratio 0.5 -> (1/0.5 - 1) - log(1/0.5) = 1 - log 2; token 1: 0
    assert stats["approx_kl"].item() == pytest.approx((1 - math.log(2)) / 2)


def test_value_loss_hand_numbers():
    old = torch.zeros(1, 4)
    values = torch.tensor([[0.5, -0.1, 0.3, 7.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    # max of unclipped/clipped squared errors: 0.64 (clipped), 1.21, 1.69 (unclipped); 0.5 * mean
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 1.69) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # token 0 takes the clipped branch (no gradient), token 1: (v-R)/3, token 2: (v-R)/3, padding 0
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.1 / 3, 1.3 / 3, 0.0]]))


def test_kl_estimators_hand_numbers_and_unbiased():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert kl_k3(logp, ref).item() == pytest.approx(-0.5 + math.log(2))
    # Monte Carlo: both estimators average to the exact KL(p || q) for x ~ p; k3 is never negative
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1, k3 = kl_k1(p.log()[x], q.log()[x]), kl_k3(p.log()[x], q.log()[x])
    assert k1.mean().item() == pytest.approx(exact, abs=0.01)
    assert k3.mean().item() == pytest.approx(exact, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any()
    assert k3.var() < k1.var()


def test_exact_kl_hand_numbers_gradient_and_zero_probabilities():
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = 0.6 * math.log(3) + 0.3 * math.log(0.6) + 0.1 * math.log(1 / 3)
    assert kl_exact(p.log(), q.log()).item() == pytest.approx(exact)
    assert kl_exact(q.log(), q.log()).item() == 0.0
    # a token the policy never picks (log p = -inf) adds nothing instead of NaN
    p0 = torch.tensor([0.0, 1.0])
    assert kl_exact(p0.log(), torch.tensor([0.5, 0.5]).log()).item() == pytest.approx(math.log(2))
    # its gradient with respect to the logits z is p * (log p - log q - KL): it pushes p towards q everywhere
    z = torch.tensor([[0.3, -0.2, 1.0]], requires_grad=True)
    log_p = torch.log_softmax(z, -1)
    kl = kl_exact(log_p, q.log()[None])
    kl.sum().backward()
    pz = log_p.exp().detach()
    expected = pz * (log_p.detach() - q.log() - kl.detach()[:, None])
    torch.testing.assert_close(z.grad, expected)


def test_entropy_and_explained_variance():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([[math.log(4), 0.0]]), atol=1e-5, rtol=0)
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0)
    # V = [1, 1, 1]: error [0, 1, 2] has variance 2/3 against Var[R] = 2/3 -> 0
    assert explained_variance(torch.ones_like(returns), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_follows_ziegler_formula():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert ctl.update(9.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))  # error clipped at +0.2
    before = ctl.value
    assert ctl.update(5.4, 256) == pytest.approx(before * (1 - 0.1 * 256 / 10_000))
    before = ctl.value
    assert ctl.update(0.0, 512) == pytest.approx(before * (1 - 0.2 * 512 / 10_000))  # clipped at -0.2
    copy = make_kl_controller("adaptive", 1.0, 6.0, 10_000)
    copy.load_state_dict(ctl.state_dict())
    assert copy.value == ctl.value
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    with pytest.raises(ValueError):
        make_kl_controller("pid", 0.1)


def test_exact_kl_blocked_autograd_matches_plain_autograd_and_finite_differences(monkeypatch):
    """The fused forward/backward equals autograd over the textbook formula, also across block boundaries and for
    a broadcast reference, and passes a float64 finite-difference check."""
    import rlhf.losses

    monkeypatch.setattr(rlhf.losses, "_BLOCK_ELEMENTS", 32 * 40)  # blocks of 32 rows of 40
    torch.manual_seed(0)
    # 210 rows: 7 blocks, the last one partial
    z = torch.randn(3, 70, 40, dtype=torch.float64, requires_grad=True)
    q = torch.log_softmax(torch.randn(1, 70, 40, dtype=torch.float64), -1).requires_grad_()

    def textbook(log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    fused = kl_exact(torch.log_softmax(z, -1), q)
    fused_grads = torch.autograd.grad(fused.sum(), (z, q))
    plain = textbook(torch.log_softmax(z, -1), q)
    plain_grads = torch.autograd.grad(plain.sum(), (z, q))
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b)
    small = z[:1, :5].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_exact(torch.log_softmax(a, -1), b), (small, q[:, :5]))
