"""The pieces of every stage's step: the NaN guard, the LR schedule, the KL controller."""
import math

import pytest
import torch

from rlhf_fast.config import KLConfig, OptimConfig
from rlhf_fast.stages.common import guarded_step, lr_factor, make_optimizer, make_scheduler
from rlhf_fast.stages.kl_control import KLController


def _backward(loss: torch.Tensor) -> torch.Tensor:
    """What `distributed.accumulate` hands the guarded step: the loss backpropagated, detached."""
    loss.backward()
    return loss.detach()


def test_nan_guard_never_touches_the_weights():
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model.parameters(), OptimConfig(lr=0.1))
    sched = make_scheduler(opt, OptimConfig(lr=0.1), 10)
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    x = torch.randn(4, 3)
    res = guarded_step(_backward(model(x).sum() * float("nan")), [params], opt, sched, 1.0)  # NaN loss
    assert not res.applied
    res = guarded_step(_backward(model(x * float("inf")).sum()), [params], opt, sched, 1.0)  # Inf gradient
    assert not res.applied and not math.isfinite(res.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.state == {} or all(not s for s in opt.state.values())
    assert all(p.grad is None for p in params)
    res = guarded_step(_backward(model(x).sum()), [params], opt, sched, 1.0)  # a finite step goes through
    assert res.applied and not torch.equal(before[0], model.weight)


def test_lr_schedule_warmup_then_decay():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 20) == 0.25 and lr_factor(3, cfg, 20) == 1.0
    assert lr_factor(20, cfg, 20) == pytest.approx(0.1)
    assert lr_factor(12, cfg, 20) == pytest.approx(0.55)


def test_kl_controller():
    fixed = KLController(KLConfig(coef=0.1))
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ada = KLController(KLConfig(coef=0.1, target=1.0, horizon=100))
    ada.update(5.0, 10)  # KL far above target: beta grows by at most 20% * 10/100
    assert ada.value == pytest.approx(0.1 * 1.02)
    ada.update(0.5, 10)
    assert ada.value == pytest.approx(0.1 * 1.02 * 0.98)  # error clipped to -0.2
    back = KLController(KLConfig(coef=0.1, target=1.0))
    back.load_state_dict(ada.state_dict())
    assert back.value == ada.value
