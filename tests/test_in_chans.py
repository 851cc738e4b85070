"""--in_chans end to end (SPEC §1.1): greyscale PNG folders and 13-channel .npy folders through pre-training,
fine-tuning and the reconstruction figure; the errors for missing statistics, wrong-channel files and a checkpoint
of another channel count."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import main_analyze
import main_finetune
import main_pretrain
import models_mae
import models_vit
from test_finetune import read_log
from util.data import GREY_MEAN, GREY_STD, SafeImageFolder, channel_stats, collate_skip
from util.pretrained import load_pretrained

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny models, one thread
STATS13 = ['--mean', *['0.5'] * 13, '--std', *['0.25'] * 13]


def make_grey_folder(root, n_per_class=8, size=40):
    """root/{train,val}/{a,b}/ of random greyscale ('L') PNGs: n_per_class per class in train, half in val."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_per_class), ('val', n_per_class // 2)):
        for c in ('a', 'b'):
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode='L').save(
                    os.path.join(d, f'{i:03d}.png'))
    return str(root)


def make_npy_folder(root, chans=13, n_per_class=8, size=40, bad=()):
    """root/train/{a,b}/ of float32 .npy arrays [size, size, chans]; `bad` names files written with 3 channels."""
    rng = np.random.default_rng(1)
    for c in ('a', 'b'):
        d = os.path.join(root, 'train', c)
        os.makedirs(d, exist_ok=True)
        for i in range(n_per_class):
            name = f'{c}{i:03d}.npy'
            np.save(os.path.join(d, name), rng.random((size, size, 3 if name in bad else chans), dtype=np.float32))
    return str(root)


@pytest.fixture(scope='module')
def grey_run(tmp_path_factory, pretrain_args):
    """A 1-epoch, 1-channel MAE pre-training on greyscale PNGs: (data root, output dir)."""
    root = tmp_path_factory.mktemp('grey')
    data = make_grey_folder(root / 'data')
    out = root / 'mae'
    main_pretrain.main(pretrain_args(data, out, '--epochs', '1', '--in_chans', '1'))
    return data, str(out)


def test_channel_stats_defaults_and_errors():
    """3 channels keep ImageNet's statistics, 1 gets the grey default; 13 needs --mean/--std of 13 values each."""
    assert channel_stats(3) == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert channel_stats(1) == (GREY_MEAN, GREY_STD)
    assert channel_stats(13, [0.5] * 13, [0.25] * 13) == ((0.5,) * 13, (0.25,) * 13)
    with pytest.raises(ValueError, match='--mean and --std'):
        channel_stats(13)
    with pytest.raises(ValueError, match=r'--std has 3 values; --in_chans 13'):
        channel_stats(13, [0.5] * 13, [0.25] * 3)


def test_grey_pretrain_makes_a_one_channel_mae(grey_run):
    """The greyscale run trains (finite loss, no image skipped) and saves a 1-channel patch embedding and decoder
    head, with in_chans in the checkpoint's args."""
    _, out = grey_run
    rows = read_log(out)
    assert len(rows) == 1 and np.isfinite(rows[0]['train_loss']) and rows[0]['train_loss'] > 0
    assert rows[0]['train_skipped_images'] == 0
    ckpt = torch.load(os.path.join(out, 'checkpoint-last.pth'), map_location='cpu', weights_only=True)
    assert ckpt['model']['patch_embed.proj.weight'].shape == (32, 1, 8, 8)
    assert ckpt['model']['decoder_pred.weight'].shape[0] == 8 * 8 * 1
    assert ckpt['args']['in_chans'] == 1


def test_finetune_of_grey_mae(grey_run, tmp_path, monkeypatch):
    """main_finetune --in_chans 1 --finetune <1-channel MAE> loads every encoder weight (only head/fc_norm start
    fresh), trains 1 epoch with a finite loss and an accuracy in range, and keeps the 1-channel patch embedding."""
    data, out = grey_run
    reports = []

    def recording_load(model, path, *a, **kw):
        info = load_pretrained(model, path, *a, **kw)
        reports.append(info)
        return info
    monkeypatch.setattr(main_finetune, 'load_pretrained', recording_load)
    ft = tmp_path / 'ft'
    args = main_finetune.get_args_parser().parse_args([
        '--data_path', data, '--model', 'vit_test', '--input_size', '32', '--crop_pct', '1', '--batch_size', '8',
        '--epochs', '1', '--warmup_epochs', '1', '--output_dir', str(ft), '--print_freq', '100', '--device', 'cpu',
        '--num_workers', '0', '--in_chans', '1', '--finetune', os.path.join(out, 'checkpoint-last.pth'),
        '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0'])
    result = main_finetune.main(args)
    assert len(reports) == 1 and not reports[0]['mismatched']
    assert all(k.startswith(('head.', 'fc_norm.')) for k in reports[0]['missing']), reports[0]['missing']
    row = read_log(ft)[0]
    assert np.isfinite(row['train_loss']) and 0.0 <= result['acc1'] <= 100.0
    ckpt = torch.load(ft / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    pre = torch.load(os.path.join(out, 'checkpoint-last.pth'), map_location='cpu', weights_only=True)
    assert ckpt['model']['patch_embed.proj.weight'].shape == (32, 1, 8, 8)
    # one epoch at a small lr moves the weights a little: they are the pre-trained ones, not a fresh init
    diff = (ckpt['model']['blocks.0.attn.qkv.weight'] - pre['model']['blocks.0.attn.qkv.weight']).abs().max()
    assert diff < 0.1 * pre['model']['blocks.0.attn.qkv.weight'].abs().max()


def test_npy_pretrain_13_channels_skips_wrong_channel_file(tmp_path, pretrain_args, caplog):
    """A 13-channel .npy folder pre-trains for 1 epoch with 13-value --mean/--std; the one 3-channel array in it is
    skipped with a warning and counted (train_skipped_images 1), like a corrupt image."""
    data = make_npy_folder(tmp_path / 'data', bad=('b007.npy',))  # 16 files: 4 full batches, none dropped
    ds = SafeImageFolder(os.path.join(data, 'train'), in_chans=13)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith('b007.npy')][0]
    assert ds[0][0].shape == (13, 40, 40) and ds[bad] is None
    assert any('b007.npy' in r.getMessage() and '[40, 40, 3]' in r.getMessage() for r in caplog.records)
    assert collate_skip([ds[0], ds[bad]])[2] == 1
    out = tmp_path / 'mae13'
    main_pretrain.main(pretrain_args(data, out, '--epochs', '1', '--in_chans', '13', *STATS13))
    row = read_log(out)[0]
    assert np.isfinite(row['train_loss']) and row['train_loss'] > 0
    assert row['train_skipped_images'] == 1
    ckpt = torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert ckpt['model']['patch_embed.proj.weight'].shape == (32, 13, 8, 8)
    assert ckpt['args']['mean'] == [0.5] * 13


def test_missing_stats_for_13_channels_is_a_clear_error(tmp_path, pretrain_args):
    """No --mean/--std for 13 channels, or too few values: a ValueError naming the flags, before any training."""
    data = make_npy_folder(tmp_path / 'data', n_per_class=2)
    with pytest.raises(ValueError, match=r'--in_chans 13 has no default normalisation.*--mean and --std'):
        main_pretrain.main(pretrain_args(data, tmp_path / 'a', '--in_chans', '13'))
    with pytest.raises(ValueError, match=r'--mean has 3 values; --in_chans 13'):
        main_pretrain.main(pretrain_args(data, tmp_path / 'b', '--in_chans', '13', '--mean', '0', '0', '0',
                                         '--std', *['1'] * 13))
    assert not os.path.exists(tmp_path / 'a' / 'log.txt')


def test_non_vit_model_rejects_other_channel_counts(tmp_path, pretrain_args):
    """Swin/PVT/Hiera are wired for RGB only here: --in_chans 1 is refused naming the flag."""
    with pytest.raises(ValueError, match='--in_chans 1'):
        main_pretrain.main(pretrain_args(tmp_path, tmp_path / 'o', '--model', 'mae_swin_demo', '--in_chans', '1'))


def test_three_channel_checkpoint_into_one_channel_model_fails_clearly():
    """The shared loader never lets the patch embedding start from scratch: a 3-channel checkpoint into a
    1-channel ViT raises, naming both shapes and the --in_chans to use."""
    sd = models_mae.mae_vit_test().state_dict()
    with pytest.raises(KeyError, match=r'patch_embed\.proj\.weight: \(32, 3, 8, 8\) in the checkpoint, '
                                       r'\(32, 1, 8, 8\) in the model.*--in_chans 3'):
        load_pretrained(models_vit.vit_test(in_chans=1), {'model': sd})


def test_recon_of_grey_mae_is_grey(grey_run, tmp_path):
    """recon on the 1-channel checkpoint (channels read from it) writes recon.png; every column is grey
    (R = G = B) and the original column matches the un-normalised greyscale input range [0, 1]."""
    data, out = grey_run
    args = main_analyze.get_args_parser().parse_args([
        'recon', '--weights', os.path.join(out, 'checkpoint-last.pth'), '--data_path', data, '--output_dir',
        str(tmp_path), '--device', 'cpu', '--num_workers', '0', '--num_images', '3'])
    result = main_analyze.main(args)
    assert args.in_chans == 1 and os.path.getsize(result['png']) > 0
    arr = np.load(tmp_path / 'recon_images.npy')  # [N, columns, H, W, 3]
    assert arr.shape[:2] == (3, 6) and arr.shape[-1] == 3
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    assert arr[:, 0].min() >= 0 and arr[:, 0].max() <= 1 and arr[:, 0].std() > 0.1  # random pixels, not flat
