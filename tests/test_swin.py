"""models_swin: timm compatibility, window attention and the position MLP, stage-aware layer decay, the loader's Swin
path, and UM-MAE / SimMIM Swin through main_pretrain, then main_finetune / main_linprobe / main_knn."""
import json
import os

import pytest
import timm
import torch
from PIL import Image

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import masking
import models_swin
from util.data import DEMO_SIZE
from util.lr_decay import param_groups_lrd
from util.pretrained import load_pretrained


def test_timm_swin_tiny_loads_strictly_and_gives_the_same_logits():
    torch.manual_seed(0)
    ref = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False).eval()
    with torch.no_grad():  # large, distinct bias tables: a wrong offset index or shift mask would show
        for name, p in ref.named_parameters():
            if name.endswith('relative_position_bias_table'):
                p.normal_(0, 1.0)
    ours = models_swin.create_model('swin_tiny').eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize('ours, theirs', [('swin_small', 'swin_small_patch4_window7_224'),
                                          ('swin_base', 'swin_base_patch4_window7_224'),
                                          ('swin_large', 'swin_large_patch4_window7_224')])
def test_larger_sizes_have_timm_keys_and_shapes(ours, theirs):
    with torch.device('meta'):  # shapes only, no memory or init time
        a = models_swin.create_model(ours).state_dict()
        b = timm.create_model(theirs, pretrained=False).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.parametrize('name', ['swin_test', 'swin_demo', 'mae_swin_test', 'mae_swin_demo', 'simmim_swin_test',
                                  'simmim_swin_demo'])
def test_factory_forward_backward_every_param_gets_a_gradient(name):
    torch.manual_seed(0)
    model = models_swin.create_model(name)
    out = model(torch.randn(2, 3, 32, 32))
    loss = out.logsumexp(-1).mean() if torch.is_tensor(out) else out[0]
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


def test_factories_merge_presets_with_kwargs():
    m = models_swin.swin_test(window_size=8, num_classes=3, embed_dim=8)
    assert m.layers[0].window_size == 8 and m.head.fc.out_features == 3 and m.stem_dim == 8
    with pytest.raises(ValueError, match='valid names'):
        models_swin.create_model('swin_nope')


def test_mlp_bias_depends_only_on_coordinate_differences():
    """UM's position MLP: translating every coordinate leaves the bias unchanged; the same tokens spread twice as far
    apart (as packing produces) get a different one. Coordinates that differ by more than a window still work."""
    torch.manual_seed(0)
    attn = models_swin.WindowAttention(16, 2, window_size=4, rel_pos='mlp')
    with torch.no_grad():
        for p in attn.rpe_mlp.parameters():
            p.normal_(0, 1.0)
    coords = models_swin.window_partition(models_swin.grid_coords(4, 4), 4)  # [1, 1, 16, 2]
    radius = 40

    def bias(c):
        return attn.bias_table(radius)[models_swin.relative_index(c, radius)]  # [1, 1, L, L, H]
    with torch.no_grad():
        b0 = bias(coords)
        torch.testing.assert_close(bias(coords + torch.tensor([13, 5])), b0)
        assert not torch.allclose(bias(coords * 2), b0)
        # the entry for (Δr, Δc) is MLP(sign·log(1+|Δ|)) itself
        d = coords[0, 0, 3] - coords[0, 0, 12]
        x = models_swin.log_spaced(d.float()).view(1, 2, 1, 1)
        torch.testing.assert_close(b0[0, 0, 3, 12], attn.rpe_mlp(x).flatten())


@pytest.mark.parametrize('rel_pos', ['mlp', 'table'])
def test_coordinate_path_on_the_dense_grid_equals_the_dense_path(rel_pos):
    """Feeding a dense map with its own grid as explicit (per-sample) coordinates, the path UM-MAE's packed maps take,
    gives the dense forward's output: same offsets, same shifted windows and masks, same merging of coordinates."""
    torch.manual_seed(0)
    model = models_swin.swin_test(rel_pos=rel_pos).eval()
    x = model.patch_embed(torch.randn(2, 3, 32, 32))  # [N, 16, 16, D]
    coords = models_swin.grid_coords(16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_tokens(x, coords, 16), model.forward_tokens(x), atol=1e-5,
                                   rtol=1e-5)


def test_merge_coords_and_shift_mask():
    assert torch.equal(models_swin.merge_coords(models_swin.grid_coords(8, 8)), models_swin.grid_coords(4, 4))
    # packed coordinates: merging halves them
    ids_keep, _ = masking.uniform_masking(1, (4, 4), generator=torch.Generator().manual_seed(0))
    c = masking.packed_coords(ids_keep, (4, 4), 2)  # [1, 4, 4, 2], one 2x2 group per unit
    torch.testing.assert_close(models_swin.merge_coords(c), c[:, ::2, ::2] // 2)
    mask = models_swin.shift_mask(8, 8, 4, 2)  # [4, 16, 16]
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window never wraps
    # the bottom-right window holds four regions of 2x2 tokens: each token sees only its own region's 4 tokens
    assert torch.equal((mask[3] == 0).sum(dim=1), torch.full((16,), 4))
    assert torch.equal((mask[1] == 0).sum(dim=1), torch.full((16,), 8))


def test_stage_aware_layer_decay_groups():
    """swin_test has depths (2, 2, 2): ids patch_embed 0, blocks 1-2 / 3-4 / 5-6, merging = the last block id before
    it, norm/head 7 with scale 1 (not MAE-Lite's decay²)."""
    model = models_swin.swin_test(fc_norm=True)
    d = 0.8
    groups = param_groups_lrd(model, 0.05, d)
    of = {id(p): g for g in groups for p in g['params']}
    params = dict(model.named_parameters())
    assert set(of) == {id(p) for p in model.parameters()}
    expect = {'patch_embed.proj.weight': 0, 'patch_embed.norm.weight': 0, 'layers.0.blocks.0.attn.qkv.weight': 1,
              'layers.0.blocks.1.attn.rpe_mlp.0.weight': 2, 'layers.1.downsample.reduction.weight': 2,
              'layers.1.blocks.0.norm1.weight': 3, 'layers.1.blocks.1.mlp.fc1.weight': 4,
              'layers.2.downsample.norm.weight': 4, 'layers.2.blocks.0.attn.proj.weight': 5,
              'layers.2.blocks.1.mlp.fc2.bias': 6, 'fc_norm.weight': 7, 'head.fc.weight': 7, 'head.fc.bias': 7}
    for name, layer_id in expect.items():
        g = of[id(params[name])]
        assert g['layer_id'] == layer_id, name
        assert g['lr_scale'] == pytest.approx(d ** (7 - layer_id)), name
    assert of[id(params['head.fc.weight'])]['lr_scale'] == 1.0
    assert of[id(params['head.fc.weight'])]['weight_decay'] == 0.05
    assert of[id(params['head.fc.bias'])]['weight_decay'] == 0.0


def test_loader_resizes_tables_and_takes_um_checkpoints():
    """A SimMIM (table, window 4) encoder loads into a window-8 Swin: every table bicubic-resized 7² -> 15² rows;
    a UM-MAE checkpoint (position MLP) loads into the fc_norm Swin with only fc_norm/head missing, its norm, decoder,
    vis_mask_token and mask_token dropped."""
    torch.manual_seed(0)
    simmim = models_swin.simmim_swin_test(rel_pos='table')
    swin = models_swin.swin_test(rel_pos='table', window_size=8)
    info = load_pretrained(swin, {'model': simmim.state_dict()})
    assert info['missing'] == ['head.fc.weight', 'head.fc.bias'] and not info['mismatched']
    key = 'layers.0.blocks.0.attn.relative_position_bias_table'
    assert simmim.state_dict()[key].shape == (49, 1) and swin.state_dict()[key].shape == (225, 1)
    table = swin.state_dict()[key].view(15, 15)
    old = simmim.state_dict()[key].view(7, 7)
    assert table[7, 7] == pytest.approx(old[3, 3].item(), abs=0.3 * old.abs().max().item())  # centre stays centre

    um = models_swin.mae_swin_test()
    ft = models_swin.swin_test(fc_norm=True)
    info = load_pretrained(ft, {'model': um.state_dict()})
    assert sorted(info['missing']) == ['fc_norm.bias', 'fc_norm.weight', 'head.fc.bias', 'head.fc.weight']
    assert not info['unexpected'] and not info['mismatched']
    for k, v in ft.state_dict().items():
        if not k.startswith(('fc_norm', 'head')):
            assert torch.equal(v, um.state_dict()[k]), k


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny models, one thread


def test_um_swin_tiny_recipe_and_checkpoint_layout():
    """--recipe um_swin fine-tunes Swin-T at 256 px with window 16 and the position MLP (SPEC §4), and a full-size
    UM-MAE Swin-T checkpoint's encoder has exactly that model's keys and shapes (norm dropped for fc_norm)."""
    a = main_finetune.set_recipe_defaults(main_finetune.get_args_parser().parse_args(
        ['--recipe', 'um_swin', '--data_path', '/x']))
    assert (a.model, a.input_size, a.layer_decay, a.drop_path, a.blr, a.epochs) == (
        'swin_tiny_patch4_window16_256', 256, 0.85, 0.1, 5e-4, 100)
    with torch.device('meta'):
        um = models_swin.create_model('mae_swin_tiny').state_dict()
        ft = models_swin.create_model(a.model, fc_norm=True)
    assert [s.window_size for s in ft.layers] == [16, 16, 16, 8] and ft.rel_pos == 'mlp'
    enc = {k: v.shape for k, v in um.items() if not k.startswith(('decoder', 'mask_token', 'vis_mask_token', 'norm.'))}
    assert enc == {k: v.shape for k, v in ft.state_dict().items() if not k.startswith(('fc_norm', 'head'))}


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """A 200 / 50 image subset of the demo digits (the first 20 / 5 per class of util.data's train/ and val/),
    written as util.data.materialise_digits writes them."""
    from sklearn.datasets import load_digits
    root = tmp_path_factory.mktemp('digits')
    left = {'train': [20] * 10, 'val': [5] * 10}
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        split = 'val' if i % 5 == 0 else 'train'
        if left[split][label] == 0:
            continue
        left[split][label] -= 1
        d = root / split / str(label)
        os.makedirs(d, exist_ok=True)
        pil = Image.fromarray((img * (255.0 / 16.0)).astype('uint8'), mode='L')
        pil.resize((DEMO_SIZE, DEMO_SIZE), Image.BICUBIC).convert('RGB').save(d / f'{i:04d}.png')
    return str(root)


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def um_checkpoint(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp('um')
    pretrain(digits, out, 'mae_swin_test')
    return str(out)


def pretrain(data, out, model):
    args = main_pretrain.get_args_parser().parse_args([
        '--data_path', data, '--output_dir', str(out), '--model', model, '--input_size', '32', '--batch_size', '20',
        '--epochs', '2', '--warmup_epochs', '1', '--blr', '1e-2', '--num_workers', '0', '--device', 'cpu',
        '--print_freq', '100'])
    return main_pretrain.main(args), args


def test_um_mae_swin_pretrains_with_falling_loss(um_checkpoint):
    rows = read_log(um_checkpoint)
    assert [r['epoch'] for r in rows] == [0, 1]
    assert rows[1]['train_loss'] < rows[0]['train_loss'] and all(0 < r['train_loss'] < 10 for r in rows)
    ckpt = torch.load(os.path.join(um_checkpoint, 'checkpoint-last.pth'), weights_only=True)
    assert ckpt['args']['model'] == 'mae_swin_test' and 'vis_mask_token' in ckpt['model']


def test_simmim_swin_pretrains_with_falling_loss(digits, tmp_path):
    model, args = pretrain(digits, tmp_path, 'simmim_swin_test')
    assert isinstance(model, models_swin.SimMIMSwin) and args.mask_ratio == 0.6
    rows = read_log(tmp_path)
    assert [r['epoch'] for r in rows] == [0, 1]
    assert rows[1]['train_loss'] < rows[0]['train_loss'] and all(0 < r['train_loss'] < 10 for r in rows)


def test_um_checkpoint_fine_tunes_and_probes(um_checkpoint, digits, tmp_path):
    ckpt = os.path.join(um_checkpoint, 'checkpoint-last.pth')
    common = ['--data_path', digits, '--model', 'swin_test', '--input_size', '32', '--num_workers', '0', '--device',
              'cpu', '--print_freq', '100', '--finetune', ckpt]
    ft = main_finetune.main(main_finetune.get_args_parser().parse_args([
        *common, '--output_dir', str(tmp_path / 'ft'), '--epochs', '1', '--warmup_epochs', '0', '--batch_size', '20',
        '--crop_pct', '1', '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--blr', '4e-3']))
    assert 0.0 <= ft['acc1'] <= 100.0 and ft['acc1'] <= ft['acc5']
    saved = torch.load(tmp_path / 'ft' / 'checkpoint-last.pth', weights_only=True)['model']
    assert saved['head.fc.weight'].shape == (10, 64) and 'fc_norm.weight' in saved and 'norm.weight' not in saved

    lp = main_linprobe.main(main_linprobe.get_args_parser().parse_args([
        *common, '--output_dir', str(tmp_path / 'lp'), '--epochs', '1', '--warmup_epochs', '0', '--batch_size', '20',
        '--feature', 'avg']))
    assert 0.0 <= lp['acc1'] <= 100.0
    knn = main_knn.main(main_knn.get_args_parser().parse_args([
        *common, '--output_dir', str(tmp_path / 'knn'), '--batch_size', '50', '--feature', 'avg', '--nb_knn', '10']))
    # frozen pre-trained features of 10 digit classes: far above the 10% of chance even after two tiny epochs
    assert knn['n_train'] == 200 and knn['n_test'] == 50 and knn['test_knn10_acc1'] > 20.0
    with pytest.raises(ValueError, match='no cls token'):
        main_knn.main(main_knn.get_args_parser().parse_args([*common, '--output_dir', str(tmp_path / 'k2')]))
