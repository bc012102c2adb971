"""train/loop/optim.py's AdamW against torch.optim.AdamW, and its two paths against each other.

Each test trains two copies of a small model on the same batches, one with each optimizer, and
compares the parameters (and the optimizer's moments) after the run.
"""

import io

import pytest
import torch
from torch import nn

from train.loop.optim import AdamW

# fp32: our readable path forms m as b1*m + (1-b1)*g where torch uses lerp, so the two round
# differently in the last bit; over 50 steps of this small model that stays near 1e-7 absolute
# (parameters are O(1)), while a wrong formula moves them far more: adding eps to sqrt(v) before
# the bias correction instead of after already moves them by ~3e-5.
ATOL = 1e-6


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


def param_groups(model):
    """Three groups with their own lr, weight decay and betas; the bias/LayerNorm one has no
    decay, as in BERT fine-tuning. The `name` keys must survive a state_dict round trip."""
    lin1, ln, _, lin2 = model
    return [
        dict(params=[lin1.weight], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), name="in"),
        dict(params=[lin1.bias, ln.weight, ln.bias, lin2.bias], lr=3e-3, weight_decay=0.0,
             betas=(0.8, 0.99), name="no_decay"),
        dict(params=[lin2.weight], lr=5e-3, weight_decay=0.05, betas=(0.95, 0.98), eps=1e-6,
             name="out"),
    ]


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)) for _ in range(n)]


def train_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def roundtrip(opt, build):
    """Save `opt` through torch.save into bytes, load it with weights_only=True into a fresh
    optimizer from `build()`, as a resumed run would."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = build()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh


def assert_same(model_a, opt_a, model_b, opt_b):
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys(), name
        if sa:
            assert int(sa["step"]) == int(sb["step"]), name
            torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], atol=ATOL, rtol=0)
            torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_torch_adamw_across_a_resume(foreach):
    ours_model, ref_model = make_model(), make_model()
    ours = AdamW(param_groups(ours_model), foreach=foreach)
    ref = torch.optim.AdamW(param_groups(ref_model))
    data = batches(50)
    for i, (x, y) in enumerate(data):
        if i == 25:  # resume ours mid-run from a saved state dict; the reference runs on
            ours = roundtrip(ours, lambda: AdamW(param_groups(ours_model), foreach=foreach))
            assert [g["name"] for g in ours.param_groups] == ["in", "no_decay", "out"]
            assert isinstance(ours.state[ours_model[0].weight]["step"], int)
        train_step(ours_model, ours, x, y)
        train_step(ref_model, ref, x, y)
    assert_same(ours_model, ours, ref_model, ref)
    # the run must have moved the parameters, or the comparison above proves nothing
    assert (ours_model[0].weight - make_model()[0].weight).abs().max() > 1e-2


def test_readable_path_equals_foreach_path():
    model_a, model_b = make_model(), make_model()
    readable = AdamW(param_groups(model_a), foreach=False)
    fast = AdamW(param_groups(model_b), foreach=True)
    for x, y in batches(50):
        train_step(model_a, readable, x, y)
        train_step(model_b, fast, x, y)
    assert_same(model_a, readable, model_b, fast)


@pytest.mark.parametrize("foreach", [False, True])
def test_param_without_grad_gets_no_state_and_no_decay(foreach):
    model = make_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    unused = nn.Parameter(torch.ones(3))  # requires grad but is not in the loss: grad stays None
    groups = param_groups(model)
    groups[0]["params"].append(unused)
    opt = AdamW(groups, foreach=foreach)
    before = frozen.detach().clone()
    for x, y in batches(5):
        train_step(model, opt, x, y)
    assert frozen not in opt.state and unused not in opt.state
    # weight decay is part of the update, so a skipped parameter is not decayed either
    assert torch.equal(frozen, before) and torch.equal(unused, torch.ones(3))
    assert model[3].weight in opt.state
    saved = opt.state_dict()
    assert len(saved["state"]) == sum(1 for p in model.parameters() if p.requires_grad)
    ours = roundtrip(opt, lambda: AdamW(groups, foreach=foreach))
    assert frozen not in ours.state


@pytest.mark.parametrize("foreach", [False, True])
def test_add_param_group_later_matches_torch(foreach):
    """Gradual unfreezing: train the head only, then unfreeze the first layer as a new group
    with its own lr and name; torch's AdamW doing the same is the reference."""
    def run(make_opt):
        model = make_model()
        lin1, ln, _, lin2 = model
        for p in [lin1.weight, lin1.bias]:
            p.requires_grad_(False)
        opt = make_opt([dict(params=[ln.weight, ln.bias, lin2.weight, lin2.bias], name="head")])
        for i, (x, y) in enumerate(batches(30)):
            if i == 10:
                for p in [lin1.weight, lin1.bias]:
                    p.requires_grad_(True)
                opt.add_param_group(dict(params=[lin1.weight, lin1.bias], lr=2e-3,
                                         weight_decay=0.0, name="layer0"))
            train_step(model, opt, x, y)
        return model, opt

    ours_model, ours = run(lambda groups: AdamW(groups, lr=1e-2, foreach=foreach))
    ref_model, ref = run(lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    assert [g["name"] for g in ours.param_groups] == ["head", "layer0"]
    assert ours.param_groups[1]["betas"] == (0.9, 0.999)  # defaults filled in for the new group
    assert ours.state[ours_model[0].weight]["step"] == 20  # fresh state, counted from unfreezing
    assert_same(ours_model, ours, ref_model, ref)


def test_foreach_default_and_bad_arguments():
    model = make_model()
    assert AdamW(model.parameters()).foreach is False  # None resolves to False on CPU params
    for bad in [dict(lr=-1.0), dict(eps=-1e-8), dict(betas=(1.0, 0.999)),
                dict(betas=(0.9, -0.1)), dict(weight_decay=-0.1)]:
        with pytest.raises(ValueError):
            torch.optim.AdamW(model.parameters(), **bad)  # the reference refuses it too
        with pytest.raises(ValueError):
            AdamW(model.parameters(), **bad)
