"""models_pvt: PVT v1 forward/backward, spatial-reduction attention, UM-MAE packing with packed sin-cos positions,
the loader's sr-conv conversion (pre-training 2-1-1 -> fine-tuning 4-2-1), stage-aware layer decay, checkpoint
round trip, and UM-MAE PVT through main_pretrain then main_finetune / main_knn on the demo digits."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import main_finetune
import main_knn
import main_pretrain
import masking
import models_pvt
import models_swin
from util.lr_decay import param_groups_lrd
from util.pos_embed import get_1d_sincos_pos_embed
from util.pretrained import load_pretrained

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny models, one thread


@pytest.mark.parametrize('name, out_shape', [('pvt_test', (2, 10)), ('pvt_demo', (2, 10)),
                                             ('mae_pvt_test', (2, 64, 48)), ('mae_pvt_demo', (2, 64, 48))])
def test_forward_backward_reaches_every_parameter(name, out_shape):
    """Logits [N, classes], or UM-MAE's (loss, pred [N, 64 units, 4*4*3], mask [N, 64]); one backward gives every
    trainable parameter (sr convs and their norms, vis_mask_token, decoder) a non-zero gradient."""
    torch.manual_seed(0)
    model = models_pvt.create_model(name)
    result = model(torch.randn(2, 3, 32, 32))
    if torch.is_tensor(result):
        assert result.shape == out_shape
        result = (result.logsumexp(-1).mean(), result)
    assert result[1].shape == out_shape and torch.isfinite(result[0])
    result[0].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any('.attn.sr.' in n for n in trainable)
    no_grad = sorted(n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0)
    assert no_grad == [], no_grad


def test_pvt_small_layout_and_sr_ratios():
    """PVT-S: widths 64-128-320-512, depths 3-4-6-3, 24.1M parameters with 1000 classes; sr convs of kernel 8/4/2
    and none in stage 4 at fine-tuning, 4/2 and none in stages 3-4 for UM-MAE pre-training."""
    with torch.device('meta'):
        ft = models_pvt.create_model('pvt_small')
        pt = models_pvt.create_model('mae_pvt_small')
    assert sum(p.numel() for p in ft.parameters()) == pytest.approx(24.1e6, rel=0.01)
    assert [len(getattr(ft, f'block{s}')) for s in range(1, 5)] == [3, 4, 6, 3]
    assert [getattr(ft, f'patch_embed{s}').proj.out_channels for s in range(1, 5)] == [64, 128, 320, 512]
    assert [getattr(ft, f'block{s}')[0].attn.num_heads for s in range(1, 5)] == [1, 2, 5, 8]

    def kernels(m):
        return [getattr(m, f'block{s}')[0].attn.sr.kernel_size[0] if hasattr(getattr(m, f'block{s}')[0].attn, 'sr')
                else None for s in range(1, 5)]
    assert kernels(ft) == [8, 4, 2, None] and kernels(pt) == [4, 2, None, None]
    assert pt.unit_size == 16 and pt.unit_grid == 16  # 16-px units at 256 px


def test_sr_attention_reduces_keys_and_is_exact_attention_at_sr1():
    """sr 1 is plain multi-head attention over all tokens; with sr r the keys come from the r x r-reduced map, so a
    query's output only depends on the r x r averages when sr is set to average pooling."""
    torch.manual_seed(0)
    attn = models_pvt.SpatialReductionAttention(8, 2, sr_ratio=1).eval()
    x = torch.randn(2, 4, 4, 8)
    with torch.no_grad():
        q = attn.q(x).view(2, 16, 2, 4).transpose(1, 2)
        k, v = attn.kv(x).view(2, 16, 2, 2, 4).unbind(2)
        w = (q @ k.transpose(1, 2).transpose(-1, -2) / 2.0).softmax(-1)  # [2, H, 16, 16], scale 1/sqrt(4)
        ref = attn.proj((w @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 4, 4, 8))
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)

    sra = models_pvt.SpatialReductionAttention(8, 2, sr_ratio=2).eval()
    with torch.no_grad():
        sra.sr.weight.copy_(torch.eye(8).view(8, 8, 1, 1).expand(8, 8, 2, 2) / 4)
        sra.sr.bias.zero_()
        y = x.clone()
        y[:, 0, 0] += 1.0  # a zero-mean change inside the first 2x2 window: same averages, same keys
        y[:, 0, 1] -= 1.0
        out_x, out_y = sra(x), sra(y)
    torch.testing.assert_close(out_x[:, 1:], out_y[:, 1:])  # rows untouched as queries: identical outputs
    with pytest.raises(ValueError, match='spatial-reduction'):
        sra(torch.randn(1, 3, 3, 8))


def test_factories_merge_presets_and_bad_names_and_sizes_fail_clearly():
    m = models_pvt.pvt_test(num_classes=3, sr_ratios=(2, 1, 1), embed_dims=(8, 16, 32))
    assert m.head.fc.out_features == 3 and m.sr_ratios == (2, 1, 1) and m.num_features == 32
    with pytest.raises(ValueError, match='valid names'):
        models_pvt.create_model('pvt_nope')
    with pytest.raises(ValueError, match='one entry per stage'):
        models_pvt.pvt_test(depths=(1, 1))
    with pytest.raises(ValueError, match='img_size'):
        models_pvt.pvt_test()(torch.randn(1, 3, 64, 64))


def sincos(dim, rows, cols):
    """The MAE-layout 2-D sin-cos of coordinates (rows, cols) [...]: [..., dim], built from the 1-D formula."""
    shape = rows.shape
    emb = torch.cat([get_1d_sincos_pos_embed(dim // 2, cols.flatten()),
                     get_1d_sincos_pos_embed(dim // 2, rows.flatten())], dim=1)
    return emb.float().view(*shape, dim)


def test_packed_positions_are_the_sincos_of_each_tokens_original_coordinate():
    """Every stage of the packed encoder adds the sin-cos of the coordinate each token had in the full map: at stage
    1 the coordinate of its 2x2-token patch inside its unit, at stage 2 its unit's (row, col) (one token per unit).
    ids_keep is block-row-major, not sorted: a position table gathered in sorted unit order (UM-MAE's decoder bug)
    or in the packed map's own raster order would fail."""
    torch.manual_seed(0)
    model = models_pvt.mae_pvt_test().eval()
    G, t = model.unit_grid, model.unit_tokens
    ids_keep, _ = masking.uniform_masking(2, (G, G), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(ids_keep.sort(dim=1).values, ids_keep)
    seen = {}
    position = model.position

    def spy(s, x, coords=None):
        seen[s] = position(s, x, coords)
        return seen[s]
    model.position = spy
    with torch.no_grad():
        model.forward_encoder(torch.randn(2, 3, 32, 32), ids_keep, torch.zeros(2, ids_keep.shape[1]))
    # stage 1: packed token (i, j) lies in packed block (i // t, j // t) = visible unit ids_keep[k]
    i = torch.arange(G // 2 * t)
    k = (i.view(-1, 1) // t) * (G // 2) + i.view(1, -1) // t  # [Ph, Pw] packed block of each token
    unit = ids_keep[:, k]  # [N, Ph, Pw]
    rows = (unit // G) * t + i.view(1, -1, 1) % t
    cols = (unit % G) * t + i.view(1, 1, -1) % t
    torch.testing.assert_close(seen[0], sincos(model.pos_embed1.shape[-1], rows, cols))
    assert not torch.allclose(seen[0], model.pos_embed1[:G // 2 * t, :G // 2 * t].expand_as(seen[0]))
    # stage 2: one token per visible unit, in packing order
    unit = ids_keep.view(2, G // 2, G // 2)
    torch.testing.assert_close(seen[1], sincos(model.pos_embed2.shape[-1], unit // G, unit % G))
    assert seen[2].shape == (2, G // 4, G // 4, model.num_features)


def test_packed_stage_one_tokens_equal_the_full_images_tokens_at_their_coordinates():
    """Packing keeps each token's content and position: patch embedding + position of the packed map equal the
    full image's at the original coordinates, token for token (no secondary masking here)."""
    torch.manual_seed(0)
    model = models_pvt.mae_pvt_test().eval()
    G = model.unit_grid
    ids_keep, _ = masking.uniform_masking(2, (G, G), generator=torch.Generator().manual_seed(3))
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x, coords = model.embed_visible(imgs, ids_keep, torch.zeros(2, ids_keep.shape[1]), model.patch_embed1)
        packed = x + model.position(0, x, coords)  # [N, Ph, Pw, D]
        full = model.patch_embed1(imgs)
        full = full + model.position(0, full)  # [N, H, W, D]
    gathered = torch.stack([full[n, coords[n, ..., 0], coords[n, ..., 1]] for n in range(2)])
    torch.testing.assert_close(packed, gathered, atol=1e-5, rtol=1e-5)


def test_coordinate_path_on_the_dense_grid_equals_the_dense_path():
    """A dense map fed with its own grid as explicit per-sample coordinates (the path packed maps take) gives the
    dense forward's output: same positions at every stage, same coordinate merging."""
    torch.manual_seed(0)
    model = models_pvt.pvt_test().eval()
    x = model.patch_embed1(torch.randn(2, 3, 32, 32))  # [N, 16, 16, D]
    coords = models_swin.grid_coords(16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_tokens(x, coords), model.forward_tokens(x), atol=1e-5, rtol=1e-5)


def test_loader_converts_sr_convs_from_pretraining_to_fine_tuning():
    """A UM-MAE checkpoint (sr 2-1-1) into the fine-tuning PVT (sr 4-2-1): the 2x2 sr conv of stage 1 becomes 4x4
    and answers a map constant on 2x2 patches exactly as the old one answered the map itself; stage 2 (no reduction
    before) gets a conv that is 2x2 average pooling and a LayerNorm at (1, 0). Everything else is loaded as stored;
    only fc_norm and head are missing."""
    torch.manual_seed(0)
    pt = models_pvt.mae_pvt_test()
    ft = models_pvt.pvt_test(fc_norm=True)
    info = load_pretrained(ft, {'model': {'module.' + k: v for k, v in pt.state_dict().items()}})
    assert sorted(info['missing']) == ['fc_norm.bias', 'fc_norm.weight', 'head.fc.bias', 'head.fc.weight']
    assert not info['unexpected'] and not info['mismatched']
    assert any('spatial-reduction' in n for n in info['notes'])
    old, new = pt.block1[0].attn.sr, ft.block1[0].attn.sr
    assert old.kernel_size == (2, 2) and new.kernel_size == (4, 4)
    x = torch.randn(2, 16, 8, 8)
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # [2, 16, 16, 16], constant on 2x2 patches
    with torch.no_grad():
        torch.testing.assert_close(new(up), old(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(new(torch.randn_like(up)), old(x), atol=1e-2)
    for b in range(2):
        attn = ft.block2[b].attn
        assert not hasattr(pt.block2[b].attn, 'sr')
        y = torch.randn(2, 32, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(attn.sr(y), F.avg_pool2d(y, 2), atol=1e-6, rtol=1e-6)
        assert torch.equal(attn.norm.weight, torch.ones(32)) and torch.equal(attn.norm.bias, torch.zeros(32))
    converted = {'block1.0.attn.sr.weight', 'block2.0.attn.sr.weight', 'block2.0.attn.sr.bias',
                 'block2.0.attn.norm.weight', 'block2.0.attn.norm.bias', 'block2.1.attn.sr.weight',
                 'block2.1.attn.sr.bias', 'block2.1.attn.norm.weight', 'block2.1.attn.norm.bias'}
    for k, v in ft.state_dict().items():
        if not k.startswith(('fc_norm', 'head')) and k not in converted:
            assert torch.equal(v, pt.state_dict()[k]), k


def test_fine_tuned_checkpoint_round_trips_through_the_loader():
    """A fine-tuned PVT's state dict (DDP prefix and all) loads into a fresh model with nothing missing and gives the
    same logits; a PVT checkpoint of another size fails loudly."""
    torch.manual_seed(0)
    a = models_pvt.pvt_test(fc_norm=True).eval()
    with torch.no_grad():
        a.head.fc.weight.normal_()
    b = models_pvt.pvt_test(fc_norm=True).eval()
    info = load_pretrained(b, {'model': {'module.' + k: v for k, v in a.state_dict().items()}})
    assert not info['missing'] and not info['unexpected'] and not info['mismatched']
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
    with pytest.raises(KeyError, match='essential'):
        load_pretrained(models_pvt.pvt_test(depths=(1, 3, 1)), a.state_dict())


def test_stage_aware_layer_decay_ids():
    """pvt_test has depths (1, 2, 1): patch_embed1 -> 0, block1.0 -> 1, block2.0/1 -> 2/3, block3.0 -> 4; a stage's
    patch embedding gets the id of the last block before it; fc_norm / head -> 5 with scale 1."""
    model = models_pvt.pvt_test(fc_norm=True)
    group_of = {}
    for g in param_groups_lrd(model, 0.05, 0.8):
        group_of.update({id(p): g for p in g['params']})
    assert len(group_of) == sum(1 for _ in model.parameters())  # every parameter in exactly one group
    ids = {name: group_of[id(p)]['layer_id'] for name, p in model.named_parameters()}
    assert {k: ids[k] for k in ('patch_embed1.proj.weight', 'patch_embed1.norm.bias', 'block1.0.attn.sr.weight',
                                'patch_embed2.proj.weight', 'block2.0.attn.q.weight', 'block2.1.mlp.fc2.weight',
                                'patch_embed3.norm.weight', 'block3.0.attn.kv.weight', 'fc_norm.weight',
                                'head.fc.weight')} == {
        'patch_embed1.proj.weight': 0, 'patch_embed1.norm.bias': 0, 'block1.0.attn.sr.weight': 1,
        'patch_embed2.proj.weight': 1, 'block2.0.attn.q.weight': 2, 'block2.1.mlp.fc2.weight': 3,
        'patch_embed3.norm.weight': 3, 'block3.0.attn.kv.weight': 4, 'fc_norm.weight': 5, 'head.fc.weight': 5}
    for name, p in model.named_parameters():
        assert group_of[id(p)]['lr_scale'] == pytest.approx(0.8 ** (5 - ids[name])), name
    q = dict(model.named_parameters())
    assert group_of[id(q['block2.0.attn.q.weight'])]['weight_decay'] == 0.05
    assert group_of[id(q['block2.0.attn.q.bias'])]['weight_decay'] == 0.0


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


COMMON = ['--num_workers', '0', '--device', 'cpu', '--print_freq', '1000']


def test_um_mae_pvt_recipe_on_demo_data_then_fine_tune_and_knn(demo_dir, tmp_path):
    """main_pretrain --model mae_pvt_test: 2 epochs on the demo digits with a falling loss; the checkpoint holds the
    args as a dict and unprefixed keys. main_finetune --model pvt_test then starts from it (sr convs converted) and
    main_knn probes it."""
    pt_out = tmp_path / 'pt'
    args = main_pretrain.get_args_parser().parse_args([
        *COMMON, '--output_dir', str(pt_out), '--model', 'mae_pvt_test', '--epochs', '2', '--warmup_epochs', '1',
        '--blr', '5e-3'])
    model = main_pretrain.main(args)
    assert isinstance(model, models_pvt.MaskedAutoencoderPVT) and args.input_size == 32
    rows = read_log(pt_out)
    assert [r['epoch'] for r in rows] == [0, 1]
    assert rows[1]['train_loss'] < rows[0]['train_loss'] and all(0 < r['train_loss'] < 10 for r in rows)
    ckpt = torch.load(pt_out / 'checkpoint-last.pth', weights_only=True)
    assert isinstance(ckpt['args'], dict) and ckpt['args']['model'] == 'mae_pvt_test'
    assert 'vis_mask_token' in ckpt['model'] and not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
    assert ckpt['model']['block1.0.attn.sr.weight'].shape[-1] == 2

    weights = str(pt_out / 'checkpoint-last.pth')
    ft = main_finetune.main(main_finetune.get_args_parser().parse_args([
        *COMMON, '--output_dir', str(tmp_path / 'ft'), '--model', 'pvt_test', '--finetune', weights, '--epochs', '1',
        '--batch_size', '64']))
    assert 0.0 <= ft['acc1'] <= 100.0 and ft['acc1'] <= ft['acc5']
    saved = torch.load(tmp_path / 'ft' / 'checkpoint-last.pth', weights_only=True)['model']
    assert saved['block1.0.attn.sr.weight'].shape[-1] == 4 and 'block2.0.attn.sr.weight' in saved
    assert saved['head.fc.weight'].shape == (10, 64) and 'fc_norm.weight' in saved and 'norm.weight' not in saved

    knn = main_knn.main(main_knn.get_args_parser().parse_args([
        *COMMON, '--output_dir', str(tmp_path / 'knn'), '--model', 'pvt_test', '--finetune', weights,
        '--feature', 'avg', '--nb_knn', '10', '--batch_size', '128']))
    assert knn['n_test'] == 360 and 10.0 < knn['test_knn10_acc1'] <= 100.0  # above chance on 10 classes
