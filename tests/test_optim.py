"""Parameter groups (Mask2Former rules) and per-iteration schedules."""

import math
import pickle

import pytest
import torch
from torch import nn

from densepred.engine.optim import build_adamw, param_groups
from densepred.engine.schedules import LRFactor, build_scheduler


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.backbone.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
        self.head = nn.Module()
        self.head.proj = nn.Linear(4, 4)
        self.head.norm = nn.LayerNorm(4)
        self.head.group_norm = nn.GroupNorm(2, 4)
        self.head.query_feat = nn.Embedding(5, 4)
        self.head.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _settings(model: nn.Module) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in param_groups(model, 1e-4, 0.05) for p in g["params"]}


def test_param_groups_follow_the_mask2former_rules():
    settings = _settings(Tiny())
    assert settings["backbone.0.weight"] == pytest.approx((1e-5, 0.05))  # backbone lr x 0.1
    assert settings["backbone.0.bias"] == pytest.approx((1e-5, 0.05))
    assert settings["backbone.1.weight"] == pytest.approx((1e-5, 0.0))  # norm: no decay
    assert settings["backbone.relative_position_bias_table"] == pytest.approx((1e-5, 0.0))
    assert settings["head.proj.weight"] == pytest.approx((1e-4, 0.05))
    assert settings["head.norm.weight"] == pytest.approx((1e-4, 0.0))
    assert settings["head.group_norm.bias"] == pytest.approx((1e-4, 0.0))
    assert settings["head.query_feat.weight"] == pytest.approx((1e-4, 0.0))  # embedding
    assert settings["head.level_embed"] == pytest.approx((1e-4, 0.05))  # a plain parameter keeps decay
    assert not any(name.startswith("frozen") for name in settings)  # frozen parameters are left out


def test_every_trainable_parameter_is_in_exactly_one_group():
    model = Tiny()
    optimizer = build_adamw(model)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len({g["name"] for g in optimizer.param_groups}) == len(optimizer.param_groups)


def test_poly_with_warmup_values():
    f = LRFactor("poly", total_steps=100, warmup_steps=10, warmup_factor=0.001, power=0.9)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx((0.001 * 0.5 + 0.5) * (1 - 0.05) ** 0.9)
    assert f(50) == pytest.approx(0.5**0.9)
    assert f(100) == 0.0


def test_multistep_milestones_as_fractions_and_cosine():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, total_steps=1000, name="multistep", milestones=[0.889, 0.963], gamma=0.1)
    lrs = []
    for _ in range(1000):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[888] == pytest.approx(1.0) and lrs[889] == pytest.approx(0.1) and lrs[963] == pytest.approx(0.01)
    cosine = LRFactor("cosine", total_steps=10)
    assert cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert cosine(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_schedule_resumes_at_the_same_position():
    def make():
        opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
        return opt, build_scheduler(opt, total_steps=50, name="poly", warmup_steps=5)

    opt, sched = make()
    for _ in range(17):
        opt.step()
        sched.step()
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(opt2.param_groups[0]["lr"])


def test_bad_schedule_settings_are_named():
    with pytest.raises(ValueError, match="scheduler.name='step'"):
        LRFactor("step", total_steps=10)
    with pytest.raises(ValueError, match="scheduler.milestones"):
        build_scheduler(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1), 100, "multistep", milestones=[50, 20])
