"""UM-MAE uniform masking: sampling invariants, secondary masking, packing of the visible units for Swin (tokens and
their original coordinates), each visible token's own decoder position, and UM on a ViT; SimMIM's block mask."""
import pytest
import torch

import masking
import models_mae
import models_swin


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny models, one thread


def blocks_of(mask, gh, gw):
    """[N, gh*gw] -> kept units per 2x2 block, [N, gh/2, gw/2]."""
    kept = (1 - mask).view(-1, gh // 2, 2, gw // 2, 2)
    return kept.sum(dim=(2, 4))


@pytest.mark.parametrize('seed', range(8))
def test_one_visible_unit_per_block_for_any_seed(seed):
    gh, gw = 8, 6
    ids_keep, mask = masking.uniform_masking(5, (gh, gw), generator=torch.Generator().manual_seed(seed))
    assert ids_keep.shape == (5, gh * gw // 4) and mask.shape == (5, gh * gw)
    assert torch.equal(blocks_of(mask, gh, gw), torch.ones(5, gh // 2, gw // 2))
    # ids_keep is block-row-major: entry k is the unit inside block k, and the mask keeps exactly those
    k = torch.arange(ids_keep.shape[1])
    assert torch.equal((ids_keep // gw) // 2, (k // (gw // 2)).expand(5, -1))
    assert torch.equal((ids_keep % gw) // 2, (k % (gw // 2)).expand(5, -1))
    assert torch.equal(torch.gather(mask, 1, ids_keep), torch.zeros_like(ids_keep, dtype=mask.dtype))


def test_positions_uniform_and_independent_and_seedable():
    """Each of the 4 positions of a block is chosen ~25% of the time, independently of the neighbouring block's
    choice (each of the 16 joint patterns ~1/16); the generator makes draws reproducible."""
    ids_keep, _ = masking.uniform_masking(16000, (2, 4), generator=torch.Generator().manual_seed(0))
    pos = (ids_keep // 4 % 2) * 2 + ids_keep % 2  # [N, 2]: position (0..3) chosen in each of the two blocks
    freq = torch.bincount(pos[:, 0], minlength=4).float() / pos.shape[0]
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.015), freq
    joint = torch.bincount(pos[:, 0] * 4 + pos[:, 1], minlength=16).float() / pos.shape[0]
    assert torch.allclose(joint, torch.full((16,), 1 / 16), atol=0.008), joint
    a = masking.uniform_masking(4, (6, 6), generator=torch.Generator().manual_seed(3))[0]
    b = masking.uniform_masking(4, (6, 6), generator=torch.Generator().manual_seed(3))[0]
    c = masking.uniform_masking(4, (6, 6), generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize('K, ratio', [(49, 0.25), (64, 0.25), (4, 0.25), (10, 0.5)])
def test_secondary_masking_keeps_int_visible_times_one_minus_ratio(K, ratio):
    _, vis_mask, _, _ = masking.random_masking(6, K, ratio, generator=torch.Generator().manual_seed(0))
    assert torch.equal((vis_mask == 0).sum(dim=1), torch.full((6,), int(K * (1 - ratio))))


def test_block_masking_masks_whole_mask_patches():
    """SimMIM: ceil(0.6 * 36) = 22 of the 6x6 32-px mask patches, each 8x8 tokens of a 48x48 token grid."""
    mask = masking.block_masking(3, (6, 6), 8, 0.6, generator=torch.Generator().manual_seed(0))
    grid = mask.view(3, 6, 8, 6, 8)
    coarse = grid[:, :, 0, :, 0]  # [N, 6, 6]
    assert torch.equal(grid, coarse[:, :, None, :, None].expand_as(grid))  # constant inside every mask patch
    assert torch.equal(coarse.sum(dim=(1, 2)), torch.full((3,), 22.0))


@pytest.fixture
def um():
    torch.manual_seed(0)
    return models_swin.mae_swin_test().eval()


def unit_id_image(model, N=2):
    """Images whose every pixel holds the index of the unit it lies in (all channels)."""
    G, u = model.unit_grid, model.unit_size
    ids = torch.arange(G * G, dtype=torch.float32).view(1, 1, G, 1, G, 1)
    return ids.expand(N, 3, G, u, G, u).reshape(N, 3, G * u, G * u)


def test_packing_holds_exactly_the_visible_units_with_their_coordinates(um):
    """The packed image puts visible unit ids_keep[k] at block position k; packed_coords gives every packed token the
    coordinate it had in the full token grid, and the full image's patch embedding at those coordinates equals the
    packed image's embedding token for token."""
    G, u, t = um.unit_grid, um.unit_size, um.unit_tokens
    ids_keep, _ = masking.uniform_masking(2, (G, G), generator=torch.Generator().manual_seed(1))
    packed = um.pack(unit_id_image(um), ids_keep)  # [N, 3, G/2*u, G/2*u]
    assert packed.shape == (2, 3, G // 2 * u, G // 2 * u)
    held = packed[:, 0, ::u, ::u].reshape(2, -1)  # the unit id found at each block position
    assert torch.equal(held.long(), ids_keep)
    assert torch.equal(packed, packed[:, :, ::u, ::u].repeat_interleave(u, 2).repeat_interleave(u, 3))

    coords = masking.packed_coords(ids_keep, (G, G), t)  # [N, G/2*t, G/2*t, 2]
    assert coords.shape == (2, G // 2 * t, G // 2 * t, 2)
    unit_of_token = (coords[..., 0] // t) * G + coords[..., 1] // t  # [N, Ph, Pw]
    assert torch.equal(unit_of_token[:, ::t, ::t].reshape(2, -1), ids_keep)
    imgs = torch.randn(2, 3, G * u, G * u)
    with torch.no_grad():
        full = um.patch_embed(imgs)  # [N, G*t, G*t, D]
        mine = um.patch_embed(um.pack(imgs, ids_keep))  # [N, G/2*t, G/2*t, D]
    gathered = torch.stack([full[n, coords[n, ..., 0], coords[n, ..., 1]] for n in range(2)])
    torch.testing.assert_close(mine, gathered, atol=1e-5, rtol=1e-5)


def test_each_visible_token_gets_its_own_units_decoder_position(um):
    """decoder_tokens turns last-stage packed token (i, j) into the tokens of blocks (2i..2i+1, 2j..2j+1), i.e.
    decoder token k comes from packed block k; place_visible then puts token k at unit ids_keep[k] with that unit's
    position. UM-MAE's code pairs token k with the k-th visible unit in sorted order instead: for this mask that
    order differs, so a permuted implementation fails the last assertion."""
    G = um.unit_grid
    ids_keep, _ = masking.uniform_masking(2, (G, G), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(ids_keep.sort(dim=1).values, ids_keep)  # the buggy order is really another order

    g = G // 4  # the last stage's packed map is g x g
    latent = torch.randn(2, g, g, um.num_features)
    with torch.no_grad():
        tokens = um.decoder_tokens(latent)  # [N, K, Dd]
        y = um.decoder_embed(latent)  # [N, g, g, 4*Dd]
    bw = G // 2
    for k in range(tokens.shape[1]):
        bi, bj = divmod(k, bw)
        expect = y[:, bi // 2, bj // 2, (bi % 2) * 2 + bj % 2::4]  # PixelShuffle: channel 4c + 2i + j
        torch.testing.assert_close(tokens[:, k], expect)

    x = torch.randn(2, ids_keep.shape[1], um.mask_token.shape[-1])
    with torch.no_grad():
        full = um.place_visible(x, ids_keep)  # [N, G*G, Dd]
    pos, mtok = um.decoder_pos_embed[0], um.mask_token[0, 0]
    visible = torch.zeros(2, G * G, dtype=torch.bool).scatter(1, ids_keep, True)
    for n in range(2):
        for k in range(ids_keep.shape[1]):
            unit = ids_keep[n, k]
            torch.testing.assert_close(full[n, unit], x[n, k] + pos[unit])
        torch.testing.assert_close(full[n, ~visible[n]], mtok + pos[~visible[n]])


def test_um_swin_loss_is_norm_pix_mse_on_masked_units_only(um):
    """With a given mask the loss is reproducible and depends on the masked units only: changing the pixels of a
    visible unit that is secondary-masked (so the encoder never sees them) leaves it unchanged, changing a masked
    unit's pixels changes it."""
    G, u = um.unit_grid, um.unit_size
    ids_keep, mask = masking.uniform_masking(1, (G, G), generator=torch.Generator().manual_seed(2))
    vis_mask = torch.zeros(1, ids_keep.shape[1])
    vis_mask[0, 0] = 1
    imgs = torch.randn(1, 3, G * u, G * u)
    with torch.no_grad():
        loss, pred, m = um(imgs, ids_keep=ids_keep, vis_mask=vis_mask)
        assert torch.equal(m, mask) and pred.shape == (1, G * G, u * u * 3)
        target = models_mae.patch_targets(models_mae.patchify(imgs, u), True)
        per_unit = ((pred - target) ** 2).mean(dim=-1)  # [1, L]
        assert loss.item() == pytest.approx((per_unit * mask).sum().item() / mask.sum().item(), rel=1e-5)

        def changed(unit):
            other = imgs.clone()
            r, c = divmod(int(unit), G)
            other[:, :, r * u:(r + 1) * u, c * u:(c + 1) * u] += torch.randn(1, 3, u, u)
            return um(other, ids_keep=ids_keep, vis_mask=vis_mask)[0].item()
        assert changed(ids_keep[0, 0]) == pytest.approx(loss.item(), rel=1e-6)  # secondary-masked visible unit
        assert changed(torch.nonzero(mask[0])[0, 0]) != pytest.approx(loss.item(), rel=1e-4)


def test_um_on_vit_49_visible_and_vis_mask_token_plus_pos():
    """mask_type='uniform' on a 14x14 patch grid: 49 visible patches, one per 2x2 block; 25% of them (int(49·0.75)
    = 36 kept) are shown as vis_mask_token + pos_embed, the rest as their patch embedding + pos_embed."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_test(img_size=112, mask_type='uniform').eval()
    seen = {}
    encode = model.forward_encoder

    def spy(patches, ids_keep, *a, vis_mask=None, **kw):
        seen.update(ids_keep=ids_keep, vis_mask=vis_mask)
        return encode(patches, ids_keep, *a, vis_mask=vis_mask, **kw)
    model.forward_encoder = spy
    imgs = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        loss, pred, mask = model(imgs)
    assert torch.equal((mask == 0).sum(dim=1), torch.tensor([49, 49]))
    assert torch.equal(blocks_of(mask, 14, 14), torch.ones(2, 7, 7))
    assert seen['ids_keep'].shape == (2, 49) and torch.equal(seen['vis_mask'].sum(dim=1), torch.tensor([13.0, 13.0]))

    ids_keep, vis_mask = seen['ids_keep'], seen['vis_mask']
    patches = model.patchify(imgs)
    with torch.no_grad():
        x = model.embed_visible(patches, ids_keep, vis_mask)[:, 1:]  # [N, 49, D]
        plain = model.embed_visible(patches, ids_keep)[:, 1:]
    pos = model.pos_embed[0, 1:][ids_keep]  # [N, 49, D]
    v = vis_mask.bool()
    torch.testing.assert_close(x[v], (model.vis_mask_token[0, 0] + pos)[v])
    torch.testing.assert_close(x[~v], plain[~v])
    with pytest.raises(ValueError):
        model(imgs, mask_ratio=0.5)
