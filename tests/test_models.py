"""Model factories, timm key/output compatibility and the attention extras."""
import pytest
import timm
import torch
import torch.nn.functional as F

import models_mae
import models_vit

# Small overrides per factory that keep the real widths and head counts but make the run cheap.
SMALL = dict(depth=1)
SMALL_MAE = dict(depth=1, decoder_depth=1)


def _small_img(factory):
    """Two patches per side for the patch-14/16 factories, the preset size for the test/demo ones."""
    name = factory.__name__
    if 'patch14' in name:
        return dict(img_size=28)
    if 'patch16' in name:
        return dict(img_size=32)
    return {}


def _assert_all_grads(model):
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f'{name} got no gradient'
        assert torch.isfinite(p.grad).all(), f'{name} has a non-finite gradient'
        assert p.grad.abs().sum() > 0, f'{name} got an all-zero gradient'


@pytest.mark.parametrize('factory', list(models_vit.MODELS.values()), ids=list(models_vit.MODELS))
def test_vit_factory_forward_backward(factory):
    """Every ViT factory: logits of shape [N, num_classes] and a non-zero gradient for every trainable parameter."""
    torch.manual_seed(0)
    model = factory(**SMALL, **_small_img(factory), num_classes=5)
    n = model.patch_embed.img_size[0]
    x = torch.randn(2, 3, n, n)
    logits = model(x)
    assert logits.shape == (2, 5)
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    _assert_all_grads(model)


@pytest.mark.parametrize('factory', list(models_mae.MODELS.values()), ids=list(models_mae.MODELS))
def test_mae_factory_forward_backward(factory):
    """Every MAE factory: (loss, pred [N, L, p*p*3], mask [N, L]) and a non-zero gradient for every trainable
    parameter."""
    torch.manual_seed(0)
    model = factory(**SMALL_MAE, **_small_img(factory))
    n, p = model.patch_embed.img_size[0], model.patch_size
    L = (n // p) ** 2
    loss, pred, mask = model(torch.randn(2, 3, n, n), mask_ratio=0.5)
    assert pred.shape == (2, L, p * p * 3) and mask.shape == (2, L)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    _assert_all_grads(model)


@pytest.mark.parametrize('factory, width, heads, dec', [
    (models_mae.mae_vit_tiny_patch16, 192, 12, (96, 1, 3)),
    (models_mae.mae_vit_small_patch16, 384, 12, (192, 1, 6)),
    (models_mae.mae_vit_base_patch16, 768, 12, (512, 8, 16)),
    (models_mae.mae_vit_large_patch16, 1024, 16, (512, 8, 16)),
    (models_mae.mae_vit_huge_patch14, 1280, 16, (512, 8, 16)),
])
def test_mae_presets_and_kwargs_override(factory, width, heads, dec):
    """Presets follow the spec's table, and caller kwargs override a preset (no 'got multiple values')."""
    model = factory(depth=1, img_size=32 if 'patch16' in factory.__name__ else 28, embed_dim=width)
    assert model.depth == 1 and model.embed_dim == width and model.num_heads == heads
    assert model.blocks[0].attn.num_heads == heads
    dw, dd, dh = dec
    assert model.decoder_embed.out_features == dw and len(model.decoder_blocks) == dd
    assert model.decoder_blocks[0].attn.num_heads == dh


def test_vit_tiny_param_count():
    """ViT-Tiny (192-d, 12 blocks) with the 1000-class head has 5,717,416 parameters (about 5.7 M)."""
    model = models_vit.vit_tiny_patch16()
    assert sum(p.numel() for p in model.parameters()) == 5_717_416
    assert models_vit.vit_tiny_patch16(num_heads=3).blocks[0].attn.num_heads == 3  # DeiT-Tiny via override


@pytest.mark.parametrize('alias, target', [
    ('mae_vit_tiny', 'mae_vit_tiny_patch16'), ('mae_vit_small', 'mae_vit_small_patch16'),
    ('mae_vit_base', 'mae_vit_base_patch16'), ('mae_vit_large', 'mae_vit_large_patch16'),
    ('mae_vit_huge', 'mae_vit_huge_patch14'), ('mae_vit_tiny_d13', 'mae_vit_tiny_d13_patch16'),
])
def test_mae_short_names_resolve(alias, target):
    """Short names from users' command lines map onto the right factory."""
    assert models_vit.lookup(alias, models_mae.MODELS, models_mae.ALIASES) is models_mae.MODELS[target]


@pytest.mark.parametrize('alias, target', [
    ('vit_tiny', 'vit_tiny_patch16'), ('vit_small', 'vit_small_patch16'), ('vit_base', 'vit_base_patch16'),
    ('vit_large', 'vit_large_patch16'), ('vit_huge', 'vit_huge_patch14'),
])
def test_vit_short_names_resolve(alias, target):
    assert models_vit.lookup(alias, models_vit.MODELS, models_vit.ALIASES) is models_vit.MODELS[target]


def test_short_name_builds_the_preset():
    """create_model with a short name builds the named preset, kwargs still applied."""
    model = models_mae.create_model('mae_vit_tiny', depth=1, img_size=32)
    assert model.embed_dim == 192 and model.num_heads == 12 and model.depth == 1


@pytest.mark.parametrize('create, valid', [(models_vit.create_model, 'vit_tiny_patch16'),
                                           (models_mae.create_model, 'mae_vit_tiny_patch16')])
def test_unknown_name_lists_valid_names(create, valid):
    """An unknown model name raises ValueError naming it and listing the valid factories."""
    with pytest.raises(ValueError) as e:
        create('vit_gigantic_patch99')
    assert 'vit_gigantic_patch99' in str(e.value) and valid in str(e.value)


def _random_timm(name, **kwargs):
    """A timm ViT with every tensor random (LayerNorm weights around 1, everything else around 0, biases included),
    so a key mix-up cannot hide behind a default init value such as a zero bias."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, weight_init='skip', **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(std=0.02)
            if 'norm' in name and name.endswith('weight'):
                p.add_(1.0)
    return model


@pytest.mark.parametrize('timm_name, ours, kwargs', [
    ('vit_tiny_patch16_224', models_vit.vit_tiny_patch16, dict(num_heads=12)),
    ('vit_tiny_patch16_224', models_vit.vit_tiny_patch16, dict(num_heads=12, global_pool='avg')),
    ('vit_base_patch16_224', models_vit.vit_base_patch16, dict()),
])
def test_vit_matches_timm(timm_name, ours, kwargs):
    """timm's state dict loads strictly (both ways) and gives the same logits in eval mode."""
    ref = _random_timm(timm_name, **kwargs)
    model = ours(**kwargs).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(model.state_dict(), strict=True)
    if kwargs.get('global_pool') == 'avg':
        keys = model.state_dict().keys()
        assert 'fc_norm.weight' in keys and 'norm.weight' not in keys
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert expected.abs().max() > 1e-2  # a meaningful comparison, not two near-zero outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_attention_extras_logits_qkv_and_fast_path(monkeypatch):
    """With an `extras` dict the block hands out q/k/v [N, H, L, d] and logits = q·kᵀ·scale [N, H, L, L], and its
    output equals the SDPA fast path, which is the only path used when nothing is requested."""
    torch.manual_seed(0)
    N, L, D, H = 2, 7, 32, 4
    block = models_vit.Block(D, H).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(N, L, D)

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    fast = block(x)
    assert len(calls) == 1, 'the fast path must use F.scaled_dot_product_attention'
    extras = {}
    slow = block(x, extras)
    assert len(calls) == 1, 'the slow path is taken when extras are requested'

    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)
    d = D // H
    qkv = block.attn.qkv(block.norm1(x)).reshape(N, L, 3, H, d)  # [N, L, 3, H, d]
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each [N, H, L, d]
    for name, ref in (('q', q), ('k', k), ('v', v)):
        assert extras[name].shape == (N, H, L, d)
        torch.testing.assert_close(extras[name], ref)
    assert extras['logits'].shape == (N, H, L, L)
    torch.testing.assert_close(extras['logits'], q @ k.transpose(-2, -1) * d ** -0.5, atol=1e-5, rtol=1e-5)


def test_vit_forward_features_extras_and_layers():
    """forward_features hands out the requested block outputs and extras without changing the tokens."""
    torch.manual_seed(0)
    model = models_vit.vit_test().eval()
    x = torch.randn(2, 3, 32, 32)
    plain = model.forward_features(x)
    tokens, outs, extras = model.forward_features(x, return_layers=(0,), extras_at=(1,))
    torch.testing.assert_close(tokens, plain, atol=1e-5, rtol=0)
    assert len(outs) == 1 and outs[0].shape == plain.shape
    assert set(extras) == {1} and extras[1]['logits'].shape == (2, 2, 17, 17)


def test_relative_position_index_and_bias_follow_beit():
    """MAE-Lite's RPE (BEiT's layout), written out by hand for a 2x3 grid: patch (r1, c1) attending to (r2, c2) uses
    entry (r1 - r2 + 1) * 5 + (c1 - c2 + 2) of the [(2*2-1)(2*3-1) + 3, H] table; the cls query row, the cls key
    column and cls->cls take entries 15, 16 and 17. The learned bias is added to the logits on both attention paths
    (SDPA and the explicit one that hands out logits), which must then agree."""
    h, w = 2, 3
    index = models_vit.relative_position_index(h, w)
    assert index.shape == (7, 7)
    for i in range(h * w):
        for j in range(h * w):
            (r1, c1), (r2, c2) = divmod(i, w), divmod(j, w)
            assert index[1 + i, 1 + j] == (r1 - r2 + h - 1) * (2 * w - 1) + (c1 - c2 + w - 1)
    assert (index[0, 1:] == 15).all() and (index[1:, 0] == 16).all() and index[0, 0] == 17
    torch.manual_seed(0)
    attn = models_vit.Attention(8, num_heads=2, qv_bias=True, rel_pos_grid=(h, w))
    assert attn.relative_position_bias_table.shape == (18, 2)
    torch.nn.init.normal_(attn.relative_position_bias_table)
    x = torch.randn(3, 7, 8)
    extras = {}
    explicit = attn(x, extras)
    torch.testing.assert_close(attn(x), explicit)
    q, k = extras['q'], extras['k']
    bias = attn.relative_position_bias_table[index.view(-1)].view(7, 7, 2).permute(2, 0, 1)
    torch.testing.assert_close(extras['logits'], q @ k.transpose(-2, -1) * attn.scale + bias)
