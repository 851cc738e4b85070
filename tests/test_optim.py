"""Learning-rate schedule (util/lr_sched.py), weight-decay groups (util/optim.py) and the lr scaling rule."""
import argparse
import math

import pytest
import torch

import models_mae
import models_vit
from util.args import resolve_lr
from util.lr_sched import adjust_learning_rate, lr_at
from util.optim import adamw

LR, MIN_LR, WARMUP, EPOCHS = 1e-3, 1e-5, 5, 25


def test_lr_schedule_endpoints_and_midpoint():
    """0 at epoch 0, linear warmup to the peak, peak at the end of warmup, cosine half-way, min_lr at the end."""
    assert lr_at(0, LR, MIN_LR, WARMUP, EPOCHS) == 0.0
    assert lr_at(WARMUP / 2, LR, MIN_LR, WARMUP, EPOCHS) == pytest.approx(LR / 2)
    assert lr_at(WARMUP, LR, MIN_LR, WARMUP, EPOCHS) == pytest.approx(LR)
    half = WARMUP + (EPOCHS - WARMUP) / 2
    assert lr_at(half, LR, MIN_LR, WARMUP, EPOCHS) == pytest.approx((LR + MIN_LR) / 2)
    quarter = WARMUP + (EPOCHS - WARMUP) / 4
    expected = MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(quarter, LR, MIN_LR, WARMUP, EPOCHS) == pytest.approx(expected)
    assert lr_at(EPOCHS, LR, MIN_LR, WARMUP, EPOCHS) == pytest.approx(MIN_LR)


def test_lr_schedule_is_monotone_after_warmup():
    values = [lr_at(WARMUP + i / 10, LR, MIN_LR, WARMUP, EPOCHS) for i in range(0, (EPOCHS - WARMUP) * 10 + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_adjust_learning_rate_applies_lr_scale():
    """Every param group gets schedule(epoch) * its lr_scale (1 when absent); the unscaled lr is returned."""
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    opt = torch.optim.SGD([{'params': [a], 'lr_scale': 0.5}, {'params': [b], 'lr_scale': 0.1}, {'params': [c]}],
                          lr=123.0)
    args = argparse.Namespace(lr=LR, min_lr=MIN_LR, warmup_epochs=WARMUP, epochs=EPOCHS)
    lr = adjust_learning_rate(opt, 10.0, args)
    assert lr == pytest.approx(lr_at(10.0, LR, MIN_LR, WARMUP, EPOCHS))
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([0.5 * lr, 0.1 * lr, lr])


def test_resolve_lr_scales_blr_by_effective_batch():
    """lr = blr * batch * accum * world / 256 unless --lr is given."""
    args = argparse.Namespace(batch_size=64, accum_iter=4, world_size=2, lr=None, blr=1.5e-4)
    assert resolve_lr(args) == pytest.approx(1.5e-4 * 512 / 256) and args.eff_batch_size == 512
    args = argparse.Namespace(batch_size=64, accum_iter=1, world_size=1, lr=0.1, blr=1.5e-4)
    assert resolve_lr(args) == 0.1


def _decay_by_name(model, wd=0.05):
    opt = adamw(model, argparse.Namespace(weight_decay=wd, lr=1e-3, device='cpu'))
    by_id = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    return {n: by_id.get(id(p)) for n, p in model.named_parameters()}, opt


@pytest.mark.parametrize('make', [models_vit.vit_test, models_mae.mae_vit_test])
def test_adamw_weight_decay_groups(make):
    """No decay for biases, norm weights, pos_embed/cls_token/mask_token; decay for Linear and patch-embed weights.
    Frozen parameters (the MAE's fixed sin-cos tables) are not optimised at all."""
    model = make()
    decay, opt = _decay_by_name(model)
    assert opt.param_groups[0]['betas'] == (0.9, 0.999)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert decay[name] is None, f'frozen {name} is in the optimizer'
        elif name.endswith('.bias') or 'norm' in name or name in ('pos_embed', 'cls_token', 'mask_token'):
            assert decay[name] == 0.0, name
        else:
            assert decay[name] == 0.05, name
    linear_weights = [f'{n}.weight' for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linear_weights and all(decay[n] == 0.05 for n in linear_weights)
    assert decay['patch_embed.proj.weight'] == 0.05
    assert decay['cls_token'] == 0.0


def test_adamw_excludes_1d_params_of_a_plain_module():
    """A module without no_weight_decay(): biases and LayerNorm parameters are still not decayed."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, _ = _decay_by_name(model)
    assert decay == {'0.weight': 0.05, '0.bias': 0.0, '1.weight': 0.0, '1.bias': 0.0}
