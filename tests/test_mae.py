"""MAE: encoder on visible patches, patchify order, the loss, external masks and mask ratio 0."""
import pytest
import torch

import masking
import models_mae
import models_vit


@pytest.fixture
def model():
    torch.manual_seed(0)
    return models_mae.mae_vit_test().eval()


def test_encoder_on_kept_patches_equals_the_straightforward_path(model):
    """Embedding only the kept patches (embed_patches) equals conv-embedding the full image, adding pos_embed[:, 1:],
    gathering the kept tokens, prepending cls + pos[0], then blocks and norm."""
    imgs = torch.randn(3, 3, 32, 32)
    ids_keep, _, _, _ = masking.random_masking(3, 16, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.forward_encoder(model.patchify(imgs), ids_keep)
        x = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]  # [N, L, D]
        x = torch.stack([x[n, ids_keep[n]] for n in range(3)])  # [N, K, D]
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(3, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in model.blocks:
            x = blk(x)
        expected = model.norm(x)
    assert got.shape == (3, 1 + 4, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('C, H, W', [(3, 32, 32), (1, 16, 16), (13, 16, 16)])
def test_patchify_round_trip_and_pqc_order(C, H, W):
    """unpatchify(patchify(x)) == x; patch (i, j) holds pixel (a, b) of channel c at index (a*p + b)*C + c."""
    p = 8
    imgs = torch.randn(2, C, H, W)
    patches = models_mae.patchify(imgs, p)
    w = W // p
    assert patches.shape == (2, (H // p) * w, p * p * C)
    assert torch.equal(models_mae.unpatchify(patches, p, C), imgs)
    for n, c, i, j, a, b in [(1, C - 1, 1, 0, 2, 5), (0, 0, 0, 1, 7, 1), (1, C // 2, 1, 1, 3, 3)]:
        assert patches[n, i * w + j, (a * p + b) * C + c] == imgs[n, c, i * p + a, j * p + b]


def test_unpatchify_rejects_non_square_grids():
    with pytest.raises(ValueError):
        models_mae.unpatchify(torch.zeros(1, 6, 12), 2, 3)


def _hand_loss(imgs, pred, mask, p, norm_pix):
    """Masked MSE written out patch by patch: norm-pix uses the patch's mean and unbiased variance, eps 1e-6."""
    N, C, H, W = imgs.shape
    w = W // p
    total, count = 0.0, 0
    for n in range(N):
        for t in range(mask.shape[1]):
            if mask[n, t] == 0:
                continue
            i, j = divmod(t, w)
            target = imgs[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                mean = target.sum() / target.numel()
                var = ((target - mean) ** 2).sum() / (target.numel() - 1)
                target = (target - mean) / torch.sqrt(var + 1e-6)
            total += ((pred[n, t].double() - target) ** 2).mean().item()
            count += 1
    return total / count


@pytest.mark.parametrize('norm_pix', [False, True])
def test_loss_equals_hand_computed_masked_mse(norm_pix):
    """The loss is the per-patch MSE (optionally against norm-pix targets) averaged over masked patches only."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_test(norm_pix_loss=norm_pix).eval()
    imgs = torch.rand(2, 3, 32, 32) * 3
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert loss.item() == pytest.approx(_hand_loss(imgs, pred, mask, 8, norm_pix), rel=1e-5)
    assert loss.item() != pytest.approx(((pred - model.patchify(imgs)) ** 2).mean().item(), rel=1e-3)


def test_external_mask_is_used_exactly(model):
    """forward(mask=m) returns m and the encoder sees exactly the patches m keeps."""
    g = torch.Generator().manual_seed(1)
    given = masking.random_masking(2, 16, 0.75, generator=g)[1]
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loss, _, mask, ids_shuffle = model(imgs, mask=given, return_ids=True)
        loss2, _, _ = model(imgs, mask=given)
    assert torch.equal(mask, given)
    for n in range(2):
        assert set(ids_shuffle[n, :4].tolist()) == set(torch.nonzero(given[n] == 0).flatten().tolist())
    assert loss.item() == loss2.item()  # same mask, same loss: nothing random left


def test_same_noise_same_result(model):
    """An external noise tensor makes the forward reproducible."""
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        a, b = model(imgs, noise=noise), model(imgs, noise=noise)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_mask_ratio_zero_encodes_everything(model):
    """mask_ratio=0: nothing masked, loss 0 (no masked patch), and the encoder output is the ViT's on the same
    weights (the MAE encoder keys load into models_vit.VisionTransformer by name)."""
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.0)
        assert (mask == 0).all() and loss.item() == 0.0 and pred.shape == (2, 16, 192)
        ids_keep, _, ids_restore, _ = masking.masking_from_noise(torch.rand(2, 16), 0.0)
        latent = model.forward_encoder(model.patchify(imgs), ids_keep)  # [N, 1+L, D], tokens in shuffled order
        latent = torch.cat([latent[:, :1], masking.gather_tokens(latent[:, 1:], ids_restore)], dim=1)

        vit = models_vit.vit_test(num_classes=0).eval()
        result = vit.load_state_dict(model.state_dict(), strict=False)
        assert result.missing_keys == []
        assert all(k.startswith(('decoder', 'mask_token')) for k in result.unexpected_keys)
        torch.testing.assert_close(latent, vit.forward_features(imgs), atol=1e-5, rtol=1e-5)


def test_pos_embeds_are_fixed_sincos(model):
    """pos_embed / decoder_pos_embed are the sin-cos tables, in the state dict and frozen."""
    from util.pos_embed import get_2d_sincos_pos_embed
    sd = model.state_dict()
    torch.testing.assert_close(sd['pos_embed'][0], get_2d_sincos_pos_embed(32, 4, cls_token=True))
    torch.testing.assert_close(sd['decoder_pos_embed'][0], get_2d_sincos_pos_embed(16, 4, cls_token=True))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_from_scratch_initialisation_is_maes():
    """MAE's init (SPEC §1.2): every Linear xavier-uniform with zero bias (the bound sqrt(6 / (fan_in + fan_out)),
    and a uniform's std, bound / sqrt(3)), the patch embedding xavier-uniform as a Linear over the flattened patch,
    LayerNorms (1, 0), cls and mask tokens normal with std 0.02."""
    torch.manual_seed(0)
    m = models_mae.mae_vit_small_patch16()
    linears = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) > 40
    for n, lin in linears:
        bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
        w = lin.weight.detach()
        assert w.abs().max() <= bound and float(w.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05), n
        assert lin.bias is None or not lin.bias.any(), n
    pw = m.patch_embed.proj.weight.detach()  # [D, C, p, p], initialised as [D, C*p*p]
    bound = (6 / (pw[0].numel() + pw.shape[0])) ** 0.5
    assert pw.abs().max() <= bound and float(pw.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    for n, mod in m.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            assert (mod.weight == 1).all() and not mod.bias.any(), n
    for t in (m.cls_token, m.mask_token):
        assert float(t.std()) == pytest.approx(0.02, rel=0.3)
