"""main_linprobe.py, util/features.py, util/evaluate.py: the frozen probe, its features, exact evaluation, and short
real runs through main(args) on tiny synthetic ImageFolders."""
import argparse
import copy
import json
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import main_linprobe
import models_mae
import models_vit
from main_linprobe import LinearProbe
from util.checkpoint import load_file
from util.data import build_loader
from util.evaluate import evaluate, shard_len
from util.features import build_frozen_encoder, check_feature, checkpoint_layout, extract_features

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny models, one thread


COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40)]


def make_color_folder(root, n_train=(8, 8, 8), n_val=(2, 2, 2), size=32, seed=0):
    """ImageNet-style root/train, root/val with one solid colour (plus noise) per class: linearly separable for any
    encoder that keeps colour. Returns str(root)."""
    rng = np.random.default_rng(seed)
    for split, counts in (('train', n_train), ('val', n_val)):
        for c, n in enumerate(counts):
            d = os.path.join(root, split, f'class{c}')
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                pixels = np.array(COLOURS[c]) + rng.integers(-30, 31, size=(size, size, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f'{i:03d}.png'))
    return str(root)


def probe_args(root, out, *argv):
    return main_linprobe.get_args_parser().parse_args([
        '--data_path', str(root), '--output_dir', str(out), '--model', 'vit_test', '--input_size', '32',
        '--batch_size', '8', '--num_workers', '0', '--device', 'cpu', '--print_freq', '100', *argv])


def mae_checkpoint(path):
    mae = models_mae.mae_vit_test()
    torch.save({'model': mae.state_dict(), 'epoch': 3}, path)
    return {k: v for k, v in mae.state_dict().items() if not k.startswith(('decoder', 'mask_token'))}


def test_head_is_bn_without_affine_and_encoder_stays_in_eval():
    torch.manual_seed(0)
    enc = models_vit.vit_test(num_classes=0, drop_rate=0.3, drop_path_rate=0.3)
    probe = LinearProbe(enc, 3)
    bn, fc = probe.head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.weight is None and bn.eps == 1e-6
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ['head.1.weight', 'head.1.bias']
    assert 0.007 < fc.weight.std() < 0.013  # trunc-normal std 0.01 (timm truncates at +-2, i.e. not at all)
    assert torch.count_nonzero(fc.bias) == 0
    probe.train(True)  # what train_one_epoch does
    assert probe.training and bn.training
    assert not any(m.training for m in probe.encoder.modules())
    x = torch.randn(4, 3, 32, 32)
    # dropout and drop-path are active in train mode: identical features prove the encoder is in eval mode
    assert torch.equal(extract_features(probe.encoder, x), extract_features(probe.encoder, x))
    assert not extract_features(probe.encoder, x).requires_grad


def test_features_token_avg_and_intermediate_layer():
    torch.manual_seed(0)
    enc = models_vit.vit_test(num_classes=0).eval()
    assert isinstance(enc.fc_norm, nn.Identity)  # no random, frozen fc_norm for 'avg' (mae#186)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = enc.forward_features(x)  # [N, 1+L, D], after norm
        truncated = copy.deepcopy(enc)
        truncated.blocks = truncated.blocks[:1]  # a ViT that ends at block 0, then its norm
        block0 = truncated.forward_features(x)
    torch.testing.assert_close(extract_features(enc, x, 'token'), tokens[:, 0])
    torch.testing.assert_close(extract_features(enc, x, 'avg'), tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(extract_features(enc, x, 'token', layer=0), block0[:, 0])
    torch.testing.assert_close(extract_features(enc, x, 'avg', layer=0), block0[:, 1:].mean(dim=1))
    assert not torch.allclose(block0[:, 0], tokens[:, 0])
    with pytest.raises(ValueError, match='out of range'):
        LinearProbe(enc, 3, layer=2)


def test_checkpoint_layouts_and_feature_warnings(caplog):
    torch.manual_seed(0)
    mae = models_mae.mae_vit_test().state_dict()
    assert checkpoint_layout(mae) == 'mae'
    enc = build_frozen_encoder('vit_test', 32, mae, 'mae')
    assert torch.equal(enc.state_dict()['blocks.1.mlp.fc2.weight'], mae['blocks.1.mlp.fc2.weight'])
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training

    ft_avg = models_vit.vit_test(global_pool='avg')
    nn.init.constant_(ft_avg.fc_norm.weight, 2.0)  # a "trained" fc_norm
    sd = ft_avg.state_dict()
    assert checkpoint_layout(sd) == 'avg'
    enc = build_frozen_encoder('vit_test', 32, sd, 'avg')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expect = ft_avg.fc_norm(ft_avg.forward_features(x)[:, 1:].mean(dim=1))
    torch.testing.assert_close(extract_features(enc, x, 'avg'), expect)
    assert checkpoint_layout(models_vit.vit_test().state_dict()) == 'token'
    assert checkpoint_layout(models_vit.vit_test(num_classes=0).state_dict()) == 'encoder'
    assert checkpoint_layout(None) is None

    cases = [('mae', 'avg', True), ('mae', 'token', False), ('avg', 'token', True), ('avg', 'avg', False),
             ('token', 'avg', True), ('token', 'token', False), (None, 'token', True)]
    for layout, feature, warns in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            check_feature(layout, feature)
        assert any(r.levelno == logging.WARNING for r in caplog.records) == warns, (layout, feature)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_shard_len_drops_exactly_the_padding():
    ds = ListDataset(torch.zeros(10, 1), torch.arange(10))
    seen = []
    for rank in range(3):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=3, rank=rank, shuffle=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler)
        n = shard_len(loader)
        seen += [int(i) for i in list(sampler)[:n]]
        assert len(list(sampler)) == 4  # 12 = 10 padded to a multiple of 3
    assert sorted(seen) == list(range(10))


def test_evaluate_top1_top5_loss_by_hand():
    torch.manual_seed(0)
    x, y = torch.randn(37, 5), torch.randint(0, 7, (37,))
    model = nn.Linear(5, 7)
    loader = build_loader(ListDataset(x, y), batch_size=8, num_workers=0, pin_mem=False, train=False)
    r = evaluate(model, loader, argparse.Namespace(device='cpu', amp='none'))
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    assert r['acc1'] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert r['acc5'] == pytest.approx(100 * (top5 == y[:, None]).any(1).float().mean().item())
    assert r['loss'] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert r['acc1'] < r['acc5']  # a random model: top-5 finds more than top-1


def test_main_trains_only_the_head_resumes_and_evaluates(tmp_path):
    root = make_color_folder(tmp_path / 'data')
    ckpt = tmp_path / 'mae.pth'
    encoder_weights = mae_checkpoint(ckpt)
    out = tmp_path / 'probe'
    os.makedirs(out)
    argv = ['--finetune', str(ckpt), '--epochs', '2', '--warmup_epochs', '1', '--save_freq', '1']
    r = main_linprobe.main(probe_args(root, out, *argv))
    with open(out / 'log.txt') as f:
        rows = [json.loads(line) for line in f]
    assert [row['epoch'] for row in rows] == [0, 1]
    for row in rows:
        assert 0.0 <= row['test_acc1'] <= row['test_acc5'] <= 100.0 and np.isfinite(row['train_loss'])
        assert row['n_parameters'] == 32 * 3 + 3  # the linear head only
    assert r['acc1'] == pytest.approx(rows[-1]['test_acc1']) and 0.0 <= r['acc1'] <= 100.0

    c0, c1 = (load_file(os.path.join(out, f'checkpoint-{e}.pth')) for e in (0, 1))
    for k, v in encoder_weights.items():  # the encoder is the MAE's, bit for bit, after both epochs
        assert torch.equal(c0['model'][f'encoder.{k}'], v) and torch.equal(c1['model'][f'encoder.{k}'], v), k
    assert not torch.equal(c0['model']['head.1.weight'], c1['model']['head.1.weight'])
    assert not torch.equal(c0['model']['head.0.running_mean'], c1['model']['head.0.running_mean'])
    assert 'head.0.weight' not in c1['model'] and 'head.0.bias' not in c1['model']  # BN without affine
    assert len(c1['optimizer']['state']) == 2  # LARS holds momentum for the head's weight and bias only

    again = main_linprobe.main(probe_args(root, out, *argv))  # auto-resume: nothing left, evaluates the checkpoint
    assert again['acc1'] == pytest.approx(r['acc1']) and again['acc5'] == pytest.approx(r['acc5'])
    ev = main_linprobe.main(probe_args(root, tmp_path / 'ev', '--eval', '--resume',
                                       str(out / 'checkpoint-last.pth')))
    assert ev['acc1'] == pytest.approx(r['acc1']) and ev['loss'] == pytest.approx(r['loss'])


@pytest.mark.parametrize('optimizer,lr,batch,epochs', [('lars', '10', '48', '30'), ('sgd', '0.5', '8', '6')])
def test_probe_learns_separable_data(tmp_path, optimizer, lr, batch, epochs):
    """Random-init encoder (a baseline run), 3 solid-colour classes: the probe gets far above chance (33 %).

    LARS runs full-batch (48 images, one step per epoch): its steps are ~lr * 0.001 of each weight's norm, so it needs
    tens of steps at a high lr, while the head's bias (1-D: plain momentum SGD) takes the full lr; with batches of 8,
    the noise in the per-batch class frequencies then throws the bias around (loss 15, accuracy at chance)."""
    root = make_color_folder(tmp_path / 'data', n_train=(16, 16, 16), n_val=(5, 5, 5))
    r = main_linprobe.main(probe_args(root, tmp_path / 'out', '--epochs', epochs, '--warmup_epochs', '2',
                                      '--optimizer', optimizer, '--lr', lr, '--batch_size', batch,
                                      '--probe_layer', '0'))
    assert r['acc1'] >= 80.0
