"""main_finetune.py: short real runs through main(args) on tiny synthetic data, presets, --eval, --finetune."""
import inspect
import json
import os
import shutil

import pytest
import torch
from PIL import Image
from timm.data import RandAugment

import main_finetune
import models_mae
import models_vit
from conftest import make_image_folder
from util.checkpoint import load_file


def finetune_args(*argv):
    return main_finetune.get_args_parser().parse_args(['--device', 'cpu', '--num_workers', '0', *argv])


@pytest.fixture
def train_val_folder(tmp_path):
    """ImageNet-style root with train/ (2 classes x 8) and val/ (2 classes x 4) random 40 px PNGs."""
    root = make_image_folder(tmp_path / 'data', n_per_class=8)
    make_image_folder(tmp_path / 'v', n_per_class=4, seed=1)
    shutil.move(str(tmp_path / 'v' / 'train'), os.path.join(root, 'val'))
    return root


def tiny(root, out, *argv):
    return finetune_args('--data_path', root, '--model', 'vit_test', '--input_size', '32', '--crop_pct', '1',
                         '--batch_size', '8', '--warmup_epochs', '1', '--output_dir', str(out), '--print_freq', '100',
                         *argv)


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def test_finetune_runs_resumes_and_eval_reproduces(train_val_folder, tmp_path):
    out = tmp_path / 'ft'
    os.makedirs(out)
    r1 = main_finetune.main(tiny(train_val_folder, out, '--epochs', '1', '--model_ema', '--model_ema_warmup'))
    # rerunning with more epochs continues from checkpoint-last.pth (epoch 1 only)
    r2 = main_finetune.main(tiny(train_val_folder, out, '--epochs', '2', '--model_ema', '--model_ema_warmup'))
    logs = read_log(out)
    assert [row['epoch'] for row in logs] == [0, 1]
    for row in logs:
        assert 0.0 <= row['test_acc1'] <= 100.0 and row['test_acc1'] <= row['test_acc5']
        assert 0.0 <= row['test_ema_acc1'] <= 100.0
        assert torch.isfinite(torch.tensor(row['train_loss']))
        assert row['n_parameters'] > 0
    assert r1['acc1'] == pytest.approx(logs[0]['test_acc1'])
    assert r2['acc1'] == pytest.approx(logs[1]['test_acc1'])
    assert r2['ema_acc1'] == pytest.approx(logs[1]['test_ema_acc1'])
    best_epoch = max(range(2), key=lambda e: (logs[e]['test_acc1'], -e))  # the first epoch reaching the max
    assert r2['best_acc1'] == pytest.approx(logs[best_epoch]['test_acc1']) and r2['best_epoch'] == best_epoch

    best = load_file(os.path.join(out, 'checkpoint-best.pth'))
    last = load_file(os.path.join(out, 'checkpoint-last.pth'))
    assert best['epoch'] == best_epoch and last['epoch'] == 1
    assert 'model_ema' in best and best['model']['head.weight'].shape == (2, 32)
    assert isinstance(best['args'], dict) and best['args']['recipe'] == 'ml_improved'

    # --eval on the saved best checkpoint gives the logged numbers again (model and EMA)
    ev = main_finetune.main(tiny(train_val_folder, tmp_path / 'ev', '--eval', '--resume',
                                 os.path.join(out, 'checkpoint-best.pth')))
    assert ev['acc1'] == pytest.approx(logs[best_epoch]['test_acc1'], abs=1e-4)
    assert ev['acc5'] == pytest.approx(logs[best_epoch]['test_acc5'], abs=1e-4)
    assert ev['loss'] == pytest.approx(logs[best_epoch]['test_loss'], rel=1e-4)
    assert ev['ema_acc1'] == pytest.approx(logs[best_epoch]['test_ema_acc1'], abs=1e-4)


def test_eval_refuses_a_checkpoint_without_head(train_val_folder, tmp_path):
    path = str(tmp_path / 'mae.pth')
    torch.save({'model': models_mae.mae_vit_test().state_dict()}, path)
    with pytest.raises(KeyError, match='head'):
        main_finetune.main(tiny(train_val_folder, tmp_path / 'ev', '--eval', '--resume', path))


HAS_RPE = 'rel_pos_bias' in inspect.signature(models_vit.VisionTransformer).parameters


@pytest.mark.parametrize('rpe', [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_RPE, reason='models_vit has no RPE option yet'))])
def test_finetune_loads_weights_and_reinits_head(train_val_folder, tmp_path, rpe):
    mae = models_mae.mae_vit_test()
    with torch.no_grad():
        for b in mae.blocks:
            b.attn.qkv.bias.normal_()
    path = str(tmp_path / 'mae.pth')
    torch.save({'model': mae.state_dict(), 'epoch': 3}, path)
    out = tmp_path / 'ft'
    os.makedirs(out)
    # lr 0: the saved weights are exactly what was loaded (AdamW's decoupled decay is scaled by the lr too)
    main_finetune.main(tiny(train_val_folder, out, '--epochs', '1', '--finetune', path, '--lr', '0', '--aa', 'none',
                            *(['--rpe'] if rpe else [])))
    sd = load_file(os.path.join(out, 'checkpoint-last.pth'))['model']
    src = mae.state_dict()
    for k in ('patch_embed.proj.weight', 'pos_embed', 'cls_token', 'blocks.1.attn.qkv.weight', 'blocks.0.mlp.fc2.bias'):
        assert torch.equal(sd[k], src[k]), k
    assert 'norm.weight' not in sd and torch.equal(sd['fc_norm.weight'], torch.ones(32))  # GAP layout
    assert 0 < sd['head.weight'].std() < 1e-4 and torch.equal(sd['head.bias'], torch.zeros(2))  # std 2e-5
    if rpe:  # the fused qkv bias became separate q/v biases; the bias tables start at 0
        b = src['blocks.1.attn.qkv.bias']
        assert torch.equal(sd['blocks.1.attn.q_bias'], b[:32]) and torch.equal(sd['blocks.1.attn.v_bias'], b[64:])
        assert 'blocks.1.attn.qkv.bias' not in sd
        assert not sd['blocks.0.attn.relative_position_bias_table'].any()
    else:
        assert torch.equal(sd['blocks.1.attn.qkv.bias'], src['blocks.1.attn.qkv.bias'])


def test_randaugment_m10_posterize_survives_current_pillow():
    """MAE-Lite's rand-m10 asks timm for posterize to 0 bits, which current Pillow rejects; we give a black image."""
    args = main_finetune.set_recipe_defaults(finetune_args('--data_path', '/x', '--aa', 'rand-m10-mstd0-inc1',
                                                           '--input_size', '32'))
    transform = main_finetune.build_transform(True, args)
    ra = next(t for t in transform.transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name == 'PosterizeIncreasing')
    op.prob = 1.0
    img = Image.new('RGB', (8, 8), (200, 100, 50))
    assert op(img).getextrema() == ((0, 0), (0, 0), (0, 0))  # 4 - int(10 / 10 * 4) = 0 bits kept
    assert main_finetune.posterize(img, 1).getpixel((0, 0)) == (128, 0, 0)
    assert main_finetune.posterize(img, 8) is img


@pytest.mark.parametrize('recipe, opt_cls, decay', [('transfer', 'sgd', 0.75), ('fb', 'adamw', 0.65)])
def test_recipes_train(train_val_folder, tmp_path, recipe, opt_cls, decay):
    out = tmp_path / recipe
    os.makedirs(out)
    r = main_finetune.main(tiny(train_val_folder, out, '--recipe', recipe, '--epochs', '1', '--global_pool', 'token'))
    assert 0.0 <= r['acc1'] <= 100.0
    ckpt = load_file(os.path.join(out, 'checkpoint-last.pth'))
    groups = ckpt['optimizer']['param_groups']
    # vit_test: depth 2, so layer ids 0..3 with scales decay^3 .. 1
    assert sorted({round(g['lr_scale'], 6) for g in groups}) == sorted(round(decay ** k, 6) for k in range(4))
    assert ('nesterov' in groups[0] and groups[0]['nesterov']) == (opt_cls == 'sgd')
    assert 'norm.weight' in ckpt['model'] and 'fc_norm.weight' not in ckpt['model']  # token pooling


def test_recipe_presets_and_overrides():
    a = main_finetune.set_recipe_defaults(finetune_args('--recipe', 'fb', '--mixup', '0', '--data_path', '/x'))
    assert a.mixup == 0.0  # the explicit flag wins ...
    assert (a.cutmix, a.reprob, a.smoothing, a.layer_decay, a.drop_path) == (1.0, 0.25, 0.1, 0.65, 0.1)  # ... alone
    assert (a.epochs, a.blr, a.aa, a.model, a.input_size) == (100, 5e-4, 'rand-m9-mstd0.5-inc1', 'vit_tiny_patch16', 224)
    assert a.dataset == 'folder'

    a = main_finetune.set_recipe_defaults(finetune_args('--data_path', '/x'))  # ml_improved by default
    assert (a.epochs, a.blr, a.layer_decay, a.mixup, a.cutmix, a.reprob, a.smoothing, a.drop_path, a.min_lr) == \
        (300, 1e-3, 0.85, 0.2, 0.0, 0.0, 0.0, 0.0, 1e-6)
    assert (a.aa, a.warmup_epochs, a.weight_decay, a.opt, a.batch_size) == \
        ('rand-m10-mstd0.5-inc1', 5, 0.05, 'adamw', 128)

    a = main_finetune.set_recipe_defaults(finetune_args('--rpe', '--data_path', '/x'))  # MAE-Lite's RPE row
    assert (a.epochs, a.blr, a.layer_decay) == (1000, 1e-3, 0.85)
    assert main_finetune.set_recipe_defaults(finetune_args('--rpe', '--epochs', '7', '--data_path', '/x')).epochs == 7

    a = main_finetune.set_recipe_defaults(finetune_args('--recipe', 'transfer', '--data_path', '/x'))
    assert (a.opt, a.lr, a.blr, a.weight_decay, a.clip_grad, a.layer_decay, a.aa, a.mixup, a.epochs) == \
        ('sgd', 0.1, None, 0.0, 1.0, 0.75, 'none', 0.0, 50)
    a = main_finetune.set_recipe_defaults(finetune_args('--recipe', 'transfer', '--blr', '0.2', '--data_path', '/x'))
    assert a.lr is None and a.blr == 0.2  # an explicit --blr replaces the preset's absolute lr

    a = main_finetune.set_recipe_defaults(finetune_args('--recipe', 'fb', '--epochs', '3'))  # demo data
    assert (a.model, a.input_size, a.epochs, a.dataset) == ('vit_demo_patch4', 32, 3, 'demo')
    assert a.layer_decay == 0.65
