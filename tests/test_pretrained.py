"""The one pretrained-weight loader: every released layout (built synthetically from our own models by renaming keys
as SPEC §5 describes) loads with equal weights; pos-embed interpolation; loud failures."""
import os

import pytest
import torch

import models_mae
import models_vit
from util.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed
from util.pretrained import load_pretrained


def encoder_keys(sd):
    """The encoder part of an MAE state dict (what the official encoder-only release holds)."""
    return {k: v for k, v in sd.items() if not (k.startswith('decoder') or k == 'mask_token')}


def assert_encoder_equal(vit, sd, skip=()):
    """Every encoder tensor of `sd` (our names) equals the ViT's."""
    mine = vit.state_dict()
    checked = 0
    for k, v in encoder_keys(sd).items():
        if k in skip or k not in mine:
            continue
        assert torch.equal(mine[k], v), k
        checked += 1
    assert checked >= 10


@pytest.fixture
def mae():
    torch.manual_seed(0)
    m = models_mae.mae_vit_test()
    for p in m.parameters():  # make biases non-zero so conversions are really checked
        p.data.normal_()
    return m


def vit(**kw):
    return models_vit.vit_test(**kw)


def test_our_pretrain_checkpoint(mae, tmp_path):
    path = str(tmp_path / 'checkpoint-last.pth')
    torch.save({'model': mae.state_dict(), 'optimizer': {}, 'epoch': 3, 'args': {'model': 'mae_vit_test'}}, path)
    v = vit()
    report = load_pretrained(v, path)
    assert_encoder_equal(v, mae.state_dict())
    assert set(report['missing']) == {'head.weight', 'head.bias'}
    assert report['unexpected'] == []


@pytest.mark.parametrize('full', [False, True])
def test_official_mae_layout(mae, full):
    """FB releases: {'model': encoder-only} and the full encoder+decoder checkpoint."""
    sd = mae.state_dict() if full else encoder_keys(mae.state_dict())
    v = vit()
    load_pretrained(v, {'model': sd})
    assert_encoder_equal(v, mae.state_dict())


def test_global_pool_drops_norm_and_starts_fc_norm_fresh(mae):
    v = vit(global_pool='avg')
    report = load_pretrained(v, {'model': mae.state_dict()})
    assert torch.equal(v.fc_norm.weight, torch.ones_like(v.fc_norm.weight))
    assert 'fc_norm.weight' in report['missing'] and not report['unexpected']


def ml(sd):
    """MAE-Lite wraps its model (`.model`) in DDP (`module.`)."""
    return {'model': {f'module.model.{k}': v for k, v in sd.items()}}


def test_mae_lite_pretrain_and_dmae_with_teacher_and_adapter(mae):
    teacher = models_vit.vit_test(embed_dim=48, num_heads=3).state_dict()
    sd = ml(mae.state_dict())['model']
    sd.update({f'module.teacher.{k}': v for k, v in teacher.items()})
    sd['module.adapter.weight'] = torch.randn(2, 2, 1, 1)
    v = vit()
    report = load_pretrained(v, {'model': sd})
    assert_encoder_equal(v, mae.state_dict())
    assert report['unexpected'] == [] and report['mismatched'] == []


def test_mae_lite_d2_thirteenth_block_is_dropped(mae):
    sd = dict(mae.state_dict())
    depth = mae.depth
    sd[f'blocks.{depth}.norm1.weight'] = torch.ones(32)
    sd[f'blocks.{depth}.attn.qkv.weight'] = torch.randn(96, 32)
    v = vit()
    report = load_pretrained(v, ml(sd))
    assert_encoder_equal(v, mae.state_dict())
    assert report['unexpected'] == []
    assert any('beyond depth' in n for n in report['notes'])


def test_fine_tuned_checkpoint_keeps_head_and_fc_norm():
    torch.manual_seed(1)
    src = vit(global_pool='avg')
    for p in src.parameters():
        p.data.normal_()
    v = vit(global_pool='avg')
    report = load_pretrained(v, ml(src.state_dict()))
    for k, t in src.state_dict().items():
        assert torch.equal(v.state_dict()[k], t), k
    assert report['missing'] == []


def test_rpe_checkpoint_with_qv_bias_and_layerscale_gammas():
    """ML RPE: separate q_bias/v_bias, relative tables, and LayerScale stored as gamma_1/gamma_2."""
    torch.manual_seed(2)
    src = vit(rel_pos_bias=True, init_values=0.1, global_pool='avg')
    for p in src.parameters():
        p.data.normal_()
    sd = {k.replace('ls1.gamma', 'gamma_1').replace('ls2.gamma', 'gamma_2'): t for k, t in src.state_dict().items()}
    v = vit(rel_pos_bias=True, init_values=0.1, global_pool='avg')
    load_pretrained(v, ml(sd))
    for k, t in src.state_dict().items():
        assert torch.equal(v.state_dict()[k], t), k


def test_qkv_bias_into_qv_model_and_back(mae):
    """A plain checkpoint into the RPE model: q_bias = b[:D], v_bias = b[2D:]; and q/v biases into a plain model."""
    v = vit(rel_pos_bias=True)
    load_pretrained(v, {'model': mae.state_dict()})
    b = mae.blocks[1].attn.qkv.bias
    D = b.shape[0] // 3
    assert torch.equal(v.blocks[1].attn.q_bias, b[:D]) and torch.equal(v.blocks[1].attn.v_bias, b[2 * D:])
    back = vit()
    load_pretrained(back, {'model': v.state_dict()})
    expect = torch.cat([b[:D], torch.zeros(D), b[2 * D:]])
    assert torch.equal(back.blocks[1].attn.qkv.bias, expect)


def test_tinymim_layout(mae):
    """TinyMIM releases an FB-style {'model': student ViT} (token pooling, head of its pre-training)."""
    torch.manual_seed(3)
    src = vit(num_classes=1000)
    v = vit(num_classes=10)
    report = load_pretrained(v, {'model': src.state_dict()})
    assert report['mismatched'] == ['head.weight', 'head.bias']
    assert v.head.weight.abs().max() < 1e-3  # re-initialised with std 2e-5
    assert torch.equal(v.blocks[0].mlp.fc2.weight, src.blocks[0].mlp.fc2.weight)


def test_mae_priv_encoder_layout_with_qv_bias_and_no_cls_pos(mae):
    """MAE-priv: `encoder.*` keys, q_bias/v_bias instead of qkv.bias, a pos-embed without the cls row."""
    sd = {}
    for k, t in encoder_keys(mae.state_dict()).items():
        if k.endswith('attn.qkv.bias'):
            D = t.shape[0] // 3
            sd['encoder.' + k.replace('qkv.bias', 'q_bias')] = t[:D]
            sd['encoder.' + k.replace('qkv.bias', 'v_bias')] = t[2 * D:]
        elif k == 'pos_embed':
            sd['encoder.pos_embed'] = t[:, 1:]
        else:
            sd['encoder.' + k] = t
    sd['decoder.pred.weight'] = torch.randn(3, 3)
    v = vit()
    report = load_pretrained(v, {'state_dict': sd})
    ref = mae.state_dict()
    for k in ('blocks.0.attn.qkv.weight', 'patch_embed.proj.weight', 'norm.weight'):
        assert torch.equal(v.state_dict()[k], ref[k])
    b = ref['blocks.1.attn.qkv.bias']
    D = b.shape[0] // 3
    assert torch.equal(v.blocks[1].attn.qkv.bias, torch.cat([b[:D], torch.zeros(D), b[2 * D:]]))
    assert torch.equal(v.pos_embed[:, 1:], ref['pos_embed'][:, 1:])
    assert torch.equal(v.pos_embed[:, 0], torch.zeros_like(v.pos_embed[:, 0]))
    assert report['unexpected'] == []


def test_moco_v3_and_timm_layouts():
    torch.manual_seed(4)
    src = vit()
    moco = {f'module.base_encoder.{k}': t for k, t in src.state_dict().items()}
    moco.update({f'module.momentum_encoder.{k}': t + 1 for k, t in src.state_dict().items()})
    moco['module.predictor.0.weight'] = torch.randn(4, 4)
    for ckpt in ({'state_dict': moco}, src.state_dict()):
        v = vit()
        report = load_pretrained(v, ckpt)
        assert report['unexpected'] == []
        for k, t in src.state_dict().items():
            if not k.startswith('head'):
                assert torch.equal(v.state_dict()[k], t), k


def test_pos_embed_interpolated_to_a_new_grid(mae):
    """32 px / patch 8 = 4x4 grid in the checkpoint; a 64 px model has 8x8: bicubic resize, cls row kept."""
    v = vit(img_size=64)
    load_pretrained(v, {'model': mae.state_dict()})
    assert v.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(v.pos_embed[:, 0], mae.pos_embed[:, 0])


@pytest.mark.parametrize('old,new', [(14, 16), (7, 14)])
def test_interpolate_pos_embed_sizes(old, new):
    """Interpolating a smooth sin-cos field up keeps it smooth and close to the true field at the new grid's
    sample points; identity at equal size."""
    D = 64
    pos = get_2d_sincos_pos_embed(D, old, cls_token=True).unsqueeze(0)
    assert interpolate_pos_embed(pos, (old, old)) is pos
    out = interpolate_pos_embed(pos, (new, new))
    assert out.shape == (1, 1 + new * new, D)
    assert torch.equal(out[:, 0], pos[:, 0])
    # sample points of the new grid in old-grid units (align_corners=False): x_old = (x_new + 0.5) * old/new - 0.5
    coords = (torch.arange(new) + 0.5) * old / new - 0.5
    cols, rows = coords.repeat(new), coords.repeat_interleave(new)
    from util.pos_embed import get_1d_sincos_pos_embed
    truth = torch.cat([get_1d_sincos_pos_embed(D // 2, cols), get_1d_sincos_pos_embed(D // 2, rows)], 1).float()
    inside = ((cols >= 0) & (cols <= old - 1) & (rows >= 0) & (rows <= old - 1))
    err = (out[0, 1:][inside] - truth[inside]).abs()
    assert err.max() < 0.15, err.max()  # the highest frequency (1 cycle per ~6 patches) bounds the error
    assert err.mean() < 0.01


def test_missing_essential_key_is_named(mae):
    sd = dict(mae.state_dict())
    del sd['blocks.1.mlp.fc1.weight']
    with pytest.raises(KeyError, match=r'blocks\.1\.mlp\.fc1\.weight'):
        load_pretrained(vit(), {'model': sd})


def test_truncated_file_names_the_file(mae, tmp_path):
    path = str(tmp_path / 'mae.pth')
    torch.save({'model': mae.state_dict()}, path)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(RuntimeError, match='mae.pth'):
        load_pretrained(vit(), path)


def test_foreign_file_without_weights(tmp_path):
    path = str(tmp_path / 'notes.pth')
    torch.save({'epoch': 3, 'note': 'hello'}, path)
    with pytest.raises(ValueError, match='no weights'):
        load_pretrained(vit(), path)
