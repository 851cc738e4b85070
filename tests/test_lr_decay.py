"""Layer-wise lr decay parameter groups (util/lr_decay.py)."""
import inspect
import types

import pytest
import torch

import models_vit
from util.lr_decay import layer_id_vit, param_groups_lrd
from util.lr_sched import adjust_learning_rate


def group_of(groups):
    """{parameter id: group} — fails if a parameter sits in two groups."""
    out = {}
    for g in groups:
        for p in g['params']:
            assert id(p) not in out, 'a parameter is in two groups'
            out[id(p)] = g
    return out


def test_scales_follow_layer_ids():
    model = models_vit.vit_test(depth=4, global_pool='avg')  # num_layers = depth + 1 = 5
    d = 0.7
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=d)
    g = group_of(groups)
    params = dict(model.named_parameters())
    expect = {'cls_token': d ** 5, 'pos_embed': d ** 5, 'patch_embed.proj.weight': d ** 5,
              'blocks.0.attn.qkv.weight': d ** 4, 'blocks.1.mlp.fc1.weight': d ** 3, 'blocks.3.norm2.bias': d ** 1,
              'fc_norm.weight': 1.0, 'head.weight': 1.0, 'head.bias': 1.0}
    for name, scale in expect.items():
        assert g[id(params[name])]['lr_scale'] == pytest.approx(scale), name
    assert g[id(params['blocks.1.mlp.fc1.weight'])]['layer_id'] == 2
    assert len({grp['lr_scale'] for grp in groups}) == 6  # ids 0..5, all different


def test_weight_decay_split():
    model = models_vit.vit_test(global_pool='token')
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.75)
    g = group_of(groups)
    for name, p in model.named_parameters():
        wd = g[id(p)]['weight_decay']
        if p.ndim == 1 or name.endswith('.bias') or name in ('pos_embed', 'cls_token'):
            assert wd == 0.0, name
        else:
            assert wd == 0.05, name
    # the 2-D weights of every kind really are decayed
    params = dict(model.named_parameters())
    for name in ('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'head.weight'):
        assert g[id(params[name])]['weight_decay'] == 0.05


def test_every_trainable_param_in_exactly_one_group():
    model = models_vit.vit_test()
    model.patch_embed.proj.weight.requires_grad_(False)
    groups = param_groups_lrd(model, 0.05, 0.75)
    g = group_of(groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(g) == trainable
    assert id(model.patch_embed.proj.weight) not in g
    assert sum(len(grp['params']) for grp in groups) == len(trainable)


def test_custom_layer_id_fn_and_lr_sched():
    model = models_vit.vit_test()
    # e.g. a Swin-style function: everything in one layer 1 of num_layers 4
    groups = param_groups_lrd(model, 0.05, 0.5, layer_id_fn=lambda name, n: 1, num_layers=4)
    assert {grp['lr_scale'] for grp in groups} == {0.5 ** 3}
    groups = param_groups_lrd(model, 0.05, 0.5)
    opt = torch.optim.AdamW(groups, lr=1.0)
    args = types.SimpleNamespace(lr=2.0, min_lr=0.0, warmup_epochs=0, epochs=10)
    lr = adjust_learning_rate(opt, 0.0, args)
    assert lr == pytest.approx(2.0)
    for grp in opt.param_groups:
        assert grp['lr'] == pytest.approx(2.0 * 0.5 ** (3 - grp['layer_id']))


def test_layer_id_vit():
    assert layer_id_vit('cls_token', 13) == 0
    assert layer_id_vit('patch_embed.proj.bias', 13) == 0
    assert layer_id_vit('blocks.11.attn.proj.weight', 13) == 12
    assert layer_id_vit('norm.weight', 13) == 13
    assert layer_id_vit('head.weight', 13) == 13


@pytest.mark.skipif('rel_pos_bias' not in inspect.signature(models_vit.VisionTransformer).parameters,
                    reason='models_vit has no RPE option yet')
def test_rpe_model_groups():
    model = models_vit.vit_test(rel_pos_bias=True)
    groups = param_groups_lrd(model, 0.05, 0.75)
    g = group_of(groups)
    params = dict(model.named_parameters())
    assert {id(p) for p in model.parameters()} == set(g)
    for name in ('blocks.0.attn.q_bias', 'blocks.0.attn.v_bias'):
        assert g[id(params[name])]['weight_decay'] == 0.0
    table = params['blocks.1.attn.relative_position_bias_table']
    assert g[id(table)]['lr_scale'] == pytest.approx(0.75)  # block 1 of 2: id 2, num_layers 3
