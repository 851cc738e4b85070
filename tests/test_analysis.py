"""util/analysis.py and main_analyze.py: attention distance/entropy on hand-built attentions, CKA and the unbiased
HSIC against their definitions, rollout, reconstruction un-normalisation and pasting, the encoder-only refusal, and
every sub-command run on a tiny MAE checkpoint in our checkpoint format."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_analyze
import models_mae
import models_vit
from util import analysis
from util.checkpoint import atomic_save


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny models, one thread


# ------------------------------------------------------------------------------------------------- attention stats

def brute_mean_pairwise_distance(h, w, unit):
    pos = [(r, c) for r in range(h) for c in range(w)]
    total = sum(math.dist(a, b) for a in pos for b in pos)
    return unit * total / len(pos) ** 2


def test_self_attention_has_zero_distance_and_entropy():
    """Every patch attends only to itself: distance 0 and entropy 0, whatever the cls row/column says."""
    L = 1 + 14 * 14
    logits = torch.full((2, 3, L, L), -1e4)
    logits[..., torch.arange(L), torch.arange(L)] = 0.0
    logits[..., 0, :] = torch.randn(L)  # the cls row and column are dropped before the re-softmax
    logits[..., :, 0] = 5.0
    d, e = analysis.attention_distance_entropy(logits, (14, 14), unit=16)
    assert d.shape == e.shape == (2, 3)
    assert torch.allclose(d, torch.zeros_like(d), atol=1e-9)
    assert torch.allclose(e, torch.zeros_like(e), atol=1e-5)  # -1 * log(1 + 1e-6) ~ -1e-6


def test_uniform_attention_entropy_and_mean_pairwise_distance():
    L = 1 + 14 * 14
    logits = torch.zeros(1, 2, L, L)
    logits[..., :, 0] = 7.0  # a strong cls column must not matter: it is removed before the re-softmax
    d, e = analysis.attention_distance_entropy(logits, (14, 14), unit=16)
    expect_e = -math.log(1 / 196 + 1e-6)  # log(196) up to the 1e-6 inside the log
    assert e[0, 0].item() == pytest.approx(expect_e, abs=1e-9)
    assert abs(e[0, 0].item() - math.log(196)) < 3e-4
    assert d[0, 0].item() == pytest.approx(brute_mean_pairwise_distance(14, 14, 16), rel=1e-9)
    d14, _ = analysis.attention_distance_entropy(logits, (14, 14), unit=14)  # --ml_compat scale
    assert d14[0, 0].item() == pytest.approx(d[0, 0].item() * 14 / 16, rel=1e-9)


def test_local_attention_distance_on_rectangular_grid():
    """Each query attends equally to itself and its right neighbour (if it has one): half a grid step on average
    for those queries, 0 for the last column."""
    h, w, unit = 3, 4, 8
    L = h * w
    logits = torch.full((1, 1, 1 + L, 1 + L), -1e4)
    for i in range(L):
        logits[0, 0, 1 + i, 1 + i] = 0.0
        if (i + 1) % w:
            logits[0, 0, 1 + i, 2 + i] = 0.0
    d, e = analysis.attention_distance_entropy(logits, (h, w), unit)
    with_neighbour = h * (w - 1)
    assert d.item() == pytest.approx(unit * 0.5 * with_neighbour / L, rel=1e-9)
    alone = L - with_neighbour  # the last column attends only to itself: entropy -log(1 + 1e-6)
    expect = (-math.log(0.5 + 1e-6) * with_neighbour - math.log(1 + 1e-6) * alone) / L
    assert e.item() == pytest.approx(expect, rel=1e-9)


# ------------------------------------------------------------------------------------------------- CKA

def u_statistic_hsic(K, L):
    """HSIC as the order-4 U-statistic over distinct index tuples (Song et al. 2012), by brute force."""
    n = K.shape[0]
    s = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        s += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
    return s / (n * (n - 1) * (n - 2) * (n - 3))


def test_unbiased_hsic_matches_u_statistic():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(7, 5, generator=g, dtype=torch.float64) + X[:, :1]
    K, L = analysis.linear_gram(X), analysis.linear_gram(Y)
    assert analysis.unbiased_hsic(K, L).item() == pytest.approx(float(u_statistic_hsic(K, L)), rel=1e-10)
    # diagonals are ignored by definition: changing them must not change the estimate
    assert analysis.unbiased_hsic(K + 3 * torch.eye(7, dtype=K.dtype), L).item() == pytest.approx(
        analysis.unbiased_hsic(K, L).item(), rel=1e-10)
    with pytest.raises(ValueError):
        analysis.unbiased_hsic(K[:3, :3], L[:3, :3])


def minibatch_cka(a, b, batch):
    acc = analysis.MinibatchCKA(1, 1)
    for s in range(0, a.shape[0], batch):
        acc.update([a[s:s + batch]], [b[s:s + batch]])
    return acc.compute()[0, 0].item()


def test_cka_self_rotation_and_noise():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 4, 8, generator=g)  # [images, tokens, D], flattened per image inside
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert minibatch_cka(X, X, 64) == pytest.approx(1.0, abs=1e-9)
    rotated = (X.double() @ Q)  # an orthogonal transform of every token's features
    assert minibatch_cka(X, rotated, 64) == pytest.approx(1.0, abs=1e-9)
    assert minibatch_cka(X, 3.0 * X, 64) == pytest.approx(1.0, abs=1e-9)  # isotropic scaling
    noise = torch.randn(512, 4, 8, generator=g)
    assert abs(minibatch_cka(X, noise, 64)) < 0.05
    # a representation that keeps part of X lands in between
    mixed = minibatch_cka(X, X + 2 * noise, 64)
    assert 0.1 < mixed < 0.5


def test_cka_matrix_layout():
    g = torch.Generator().manual_seed(2)
    A = [torch.randn(32, 6, generator=g) for _ in range(3)]
    B = [A[2], torch.randn(32, 6, generator=g)]
    acc = analysis.MinibatchCKA(3, 2)
    acc.update(A[:], B)
    cka = acc.compute()
    assert cka.shape == (3, 2)
    assert cka[2, 0].item() == pytest.approx(1.0, abs=1e-9)  # row = model A depth, column = model B depth
    assert abs(cka[0, 1].item()) < 0.5 and cka[2, 0] > cka[0, 0]


# ------------------------------------------------------------------------------------------------- rollout

def test_rollout_of_identity_attention_is_uniform():
    L, grid = 1 + 9, (3, 3)
    eye = torch.eye(L).expand(2, 4, L, L)  # [N, H, L, L]
    for fusion in ('mean', 'max', 'min'):
        R = analysis.attention_rollout([eye] * 3, fusion, discard_ratio=0.9)
        assert torch.allclose(R, torch.eye(L, dtype=R.dtype).expand(2, L, L))  # nothing mixes
        m = analysis.rollout_map(R, grid)
        assert m.shape == (2, 3, 3)
        assert torch.allclose(m, torch.full_like(m, 1 / 9))


def test_rollout_of_uniform_attention_is_uniform_over_patches():
    L = 1 + 16
    uniform = torch.full((1, 2, L, L), 1.0 / L)
    R = analysis.attention_rollout([uniform] * 4, 'mean', discard_ratio=0.0)
    assert torch.allclose(R.sum(dim=-1), torch.ones(1, L, dtype=R.dtype))  # rows stay distributions
    patches = R[0, 0, 1:]
    assert patches.min() > 0 and torch.allclose(patches, patches[0].expand_as(patches))


def test_rollout_two_blocks_by_hand_and_discard():
    g = torch.Generator().manual_seed(3)
    L = 1 + 4
    a1 = torch.rand(1, 2, L, L, generator=g).softmax(-1)
    a2 = torch.rand(1, 2, L, L, generator=g).softmax(-1)
    eye = torch.eye(L, dtype=torch.float64)

    def step(a):
        a = (a.double().amax(dim=1)[0] + eye) / 2
        return a / a.sum(-1, keepdim=True)
    expect = step(a2) @ step(a1)  # the later block acts on the earlier one's output
    R = analysis.attention_rollout([a1, a2], 'max', discard_ratio=0.0)
    assert torch.allclose(R[0], expect)
    # discard 0.5 of 4 patch columns: the 2 smallest patch entries of each row go, the cls column stays
    a = torch.tensor([[[0.5, 0.1, 0.2, 0.05, 0.15]]]).expand(1, L, L)
    out = analysis.discard_weakest(a, 0.5)
    assert torch.equal(out[0, 0], torch.tensor([0.5, 0.0, 0.2, 0.0, 0.15]))


def test_rollout_map_follows_attention():
    """Last block: cls attends only to patch 5; earlier blocks identity -> the map peaks at patch 5."""
    L, grid = 1 + 9, (3, 3)
    eye = torch.eye(L).expand(1, 1, L, L)
    last = torch.eye(L).clone()
    last[0] = 0
    last[0, 1 + 5] = 1.0
    m = analysis.rollout_map(analysis.attention_rollout([eye, eye, last[None, None]], 'mean', 0.0), grid)
    assert m.flatten().argmax().item() == 5 and m.sum().item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------- reconstruction

def test_oracle_unnormalisation_inverts_norm_pix_targets():
    g = torch.Generator().manual_seed(4)
    patches = torch.randn(2, 16, 48, generator=g, dtype=torch.float64) * 3 + 1
    target = models_mae.patch_targets(patches, norm_pix_loss=True)  # what a perfect norm-pix model predicts
    mask = (torch.rand(2, 16, generator=g) < 0.75).double()
    rec = analysis.unnormalize_prediction(target, patches, mask, (4, 4), 'oracle')
    assert torch.allclose(rec, patches, atol=1e-9)
    est = analysis.unnormalize_prediction(target, patches, mask, (4, 4), 'estimated')
    vis = ~mask.bool()
    assert torch.allclose(est[vis], patches[vis], atol=1e-9)  # visible patches know their own statistics
    assert not torch.allclose(est[mask.bool()], patches[mask.bool()], atol=1e-3)  # masked ones are guesses
    assert torch.equal(analysis.unnormalize_prediction(target, patches, mask, (4, 4), 'pixels'), target)


def test_estimated_stats_come_from_nearby_visible_patches():
    mean = torch.zeros(1, 9, 1)
    mean[0, 0] = 10.0  # visible corner patch with a bright mean
    mean[0, 8] = -10.0  # visible opposite corner
    std = torch.ones(1, 9, 1)
    mask = torch.ones(1, 9)
    mask[0, 0] = mask[0, 8] = 0
    est_mean, est_std = analysis.estimate_patch_stats(mean, std, mask, (3, 3))
    assert est_mean[0, 1] > 0 > est_mean[0, 7]  # each masked patch takes after its nearer visible patch
    assert est_mean[0, 4].item() == pytest.approx(0.0, abs=1e-6)  # the centre is equidistant
    assert torch.allclose(est_std, std)
    with pytest.raises(ValueError):
        analysis.estimate_patch_stats(mean, std, torch.ones(1, 9), (3, 3))


@pytest.mark.parametrize('name', ['mae_vit_test', 'mae_swin_test'])
def test_pasted_reconstruction_equals_input_on_visible_patches(name):
    """ViT MAE (4-px patches) and UM-MAE Swin (its 8-px units, one visible per 2x2 block)."""
    torch.manual_seed(0)
    model = main_analyze.build_masked_autoencoder(name, img_size=32, norm_pix_loss=True).eval()
    imgs = torch.randn(3, 3, 32, 32)
    out = main_analyze.reconstruct(model, imgs, 0.75, seed=5)
    vis = out['pixel_mask'] == 0  # [N, C, H, W]
    assert out['modes'] == ['oracle', 'estimated']
    assert vis.float().mean().item() == pytest.approx(0.25)
    for mode in out['modes']:
        pasted = out['columns'][f'reconstruction + visible ({mode})']
        raw = out['columns'][f'reconstruction ({mode})']
        assert torch.equal(pasted[vis], imgs[vis])  # bit-exact on visible pixels
        assert torch.equal(pasted[~vis], raw[~vis])  # and the model's output on removed ones
        assert not torch.equal(raw[vis], imgs[vis])  # (the raw reconstruction is not the input there)
    assert torch.equal(out['columns']['masked'][vis], imgs[vis])
    assert torch.all(out['columns']['masked'][~vis] == 0)
    again = main_analyze.reconstruct(model, imgs, 0.75, seed=5)  # fixed seed -> the same mask
    assert torch.equal(again['mask'], out['mask'])
    other = main_analyze.reconstruct(model, imgs, 0.75, seed=6)
    assert not torch.equal(other['mask'], out['mask'])


# ------------------------------------------------------------------------------------------------- commands

@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """A tiny trained-format MAE checkpoint (as main_pretrain saves it), an encoder-only one (as main_distill's
    checkpoint-encoder.pth), a log.txt, and a small folder of images."""
    root = tmp_path_factory.mktemp('analysis')
    torch.manual_seed(0)
    mae = models_mae.mae_vit_test(norm_pix_loss=True)
    run = root / 'run'
    run.mkdir()
    full = str(run / 'checkpoint-last.pth')
    atomic_save({'model': mae.state_dict(), 'epoch': 1,
                 'args': {'model': 'mae_vit_test', 'input_size': 32, 'norm_pix_loss': True}}, full)
    vit = models_vit.vit_test(num_classes=0)
    vit.load_state_dict({k: v for k, v in mae.state_dict().items() if k in vit.state_dict()})
    encoder = str(run / 'checkpoint-encoder.pth')
    atomic_save({'model': vit.state_dict(), 'args': {'method': 'd_mae', 'model': 'mae_vit_test'}}, encoder)
    with open(run / 'log.txt', 'w') as f:
        for epoch in range(3):
            f.write(json.dumps({'train_loss': 1.0 / (epoch + 1), 'train_lr': 1e-3 * epoch, 'train_skipped_steps': 0,
                                'test_acc1': 10.0 * epoch, 'epoch': epoch, 'n_parameters': 123}) + '\n')
    images = root / 'images'
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f'{i}.png')
    data = root / 'data'
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            d = data / split / c
            d.mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f'{i}.png')
    return dict(full=full, encoder=encoder, run=str(run), images=str(images), data=str(data), root=root)


def run_cmd(*argv):
    args = main_analyze.get_args_parser().parse_args(list(argv))
    return main_analyze.main(args)


def common(ck, out, *more):
    return ['--output_dir', str(out), '--data_path', ck['data'], '--device', 'cpu', '--num_workers', '0', *more]


def assert_png(path):
    assert os.path.isfile(path)
    with Image.open(path) as im:
        assert im.format == 'PNG' and im.size[0] > 100 and im.size[1] > 100


def test_recon_command_writes_both_norm_pix_modes(checkpoints, tmp_path):
    ck = checkpoints
    out = run_cmd('recon', '--weights', ck['full'], '--images', ck['images'], *common(ck, tmp_path))
    assert_png(out['png'])
    meta = json.load(open(tmp_path / 'recon.json'))
    assert meta['modes'] == ['oracle', 'estimated'] and len(meta['images']) == 3
    assert meta['columns'] == ['original', 'masked', 'reconstruction (oracle)', 'reconstruction + visible (oracle)',
                               'reconstruction (estimated)', 'reconstruction + visible (estimated)']
    arr = np.load(tmp_path / 'recon_images.npy')
    assert arr.shape == (3, 6, 32, 32, 3) and arr.min() >= 0 and arr.max() <= 1
    assert all(np.isfinite(v) and v > 0 for v in meta['mse_masked'].values())


def test_recon_refuses_encoder_only_checkpoint(checkpoints, tmp_path):
    ck = checkpoints
    with pytest.raises(ValueError, match='encoder weights only.*main_pretrain.py.*checkpoint-encoder.pth'):
        run_cmd('recon', '--weights', ck['encoder'], '--images', ck['images'], *common(ck, tmp_path))
    assert not os.path.exists(tmp_path / 'recon.png')


def test_attn_stats_command(checkpoints, tmp_path):
    ck = checkpoints
    out = run_cmd('attn_stats', '--weights', ck['full'], ck['encoder'], '--labels', 'mae', 'enc',
                  *common(ck, tmp_path))
    assert_png(out['png'])
    assert out['num_images'] == 10  # --num_images 1024 capped by the 10 val images
    d, e = np.load(tmp_path / 'attn_distance_mae.npy'), np.load(tmp_path / 'attn_entropy_mae.npy')
    assert d.shape == e.shape == (2, 2)  # [blocks, heads] of mae_vit_test
    # patch 8 on a 4x4 grid: distances lie between 0 and the grid diagonal; entropy between 0 and log(16)
    assert np.all(d > 0) and np.all(d <= 8 * math.hypot(3, 3))
    assert np.all(e > 0) and np.all(e <= math.log(16) + 1e-9)
    # both checkpoints hold the same encoder: the same numbers
    assert np.allclose(out['distance'][1], d) and np.allclose(out['entropy'][1], e)
    meta = json.load(open(tmp_path / 'attn_stats.json'))
    assert set(meta['models']) == {'mae', 'enc'} and meta['models']['mae']['model'] == 'vit_test'
    ml = run_cmd('attn_stats', '--weights', ck['full'], '--ml_compat', *common(ck, tmp_path / 'ml'))
    assert np.allclose(ml['distance'][0], d * 14 / 8)


def test_cka_command_model_with_itself(checkpoints, tmp_path):
    ck = checkpoints
    out = run_cmd('cka', '--weights', ck['full'], '--batch_size', '5', *common(ck, tmp_path))
    assert_png(out['png'])
    cka = np.load(tmp_path / 'cka.npy')
    assert cka.shape == (3, 3)  # 2 blocks + the final output
    assert np.allclose(np.diag(cka), 1.0, atol=1e-6) and np.allclose(cka, cka.T, atol=1e-6)
    assert out['images'] == 10
    other = run_cmd('cka', '--weights', ck['full'], '--weights_b', '', '--batch_size', '5',
                    *common(ck, tmp_path / 'vs_random'))  # against a random-init encoder
    assert other['cka'].shape == (3, 3) and not np.allclose(np.diag(other['cka']), 1.0, atol=1e-3)


def test_rollout_command(checkpoints, tmp_path):
    ck = checkpoints
    out = run_cmd('rollout', '--weights', ck['encoder'], '--images', ck['images'], *common(ck, tmp_path))
    assert_png(out['png'])
    maps = np.load(tmp_path / 'rollout_maps.npy')
    assert maps.shape == (3, 3, 4, 4)  # [fusions, images, grid]
    assert np.allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-5) and np.all(maps >= 0)


def test_curves_command(checkpoints, tmp_path):
    ck = checkpoints
    out = run_cmd('curves', '--logs', ck['run'], os.path.join(ck['run'], 'log.txt'), '--labels', 'a', 'b',
                  '--output_dir', str(tmp_path))
    assert_png(out['png'])
    assert out['panels'] == ['loss', 'lr', 'acc1']  # skipped_steps stayed 0: left out
    xs, ys = out['runs']['a']['train_loss']
    assert xs == [0, 1, 2] and ys == pytest.approx([1.0, 0.5, 1 / 3])
    with pytest.raises(ValueError, match='nothing to plot'):
        run_cmd('curves', '--logs', ck['run'], '--keys', 'nope', '--output_dir', str(tmp_path))


def test_input_size_and_model_come_from_the_checkpoint():
    proj = torch.zeros(32, 3, 8, 8)
    with_cls = {'pos_embed': torch.zeros(1, 17, 32), 'patch_embed.proj.weight': proj}  # 4x4 grid + cls, patch 8
    assert main_analyze.stored_input_size({}, with_cls) == 32
    no_cls = {'pos_embed': torch.zeros(1, 196, 32), 'patch_embed.proj.weight': proj}  # 14x14 grid
    assert main_analyze.stored_input_size({}, no_cls) == 112
    assert main_analyze.stored_input_size({'input_size': 224}, {}) == 224  # saved args win
    assert main_analyze.stored_input_size({}, {}) is None
    args = main_analyze.get_args_parser().parse_args(['rollout', '--data_path', 'x'])
    assert main_analyze.encoder_name(None, {'model': 'mae_vit_tiny_d13_patch16'}, args) == 'vit_tiny_patch16'
    assert main_analyze.encoder_name('vit_small', {'model': 'mae_vit_tiny'}, args) == 'vit_small'  # --model wins
    with pytest.raises(ValueError, match='valid names'):
        main_analyze.build_masked_autoencoder('no_such_model')


def test_mae_priv_decoder_is_converted_from_cpq(checkpoints, tmp_path):
    """MAE-priv's decoder predicts (c, p, q)-ordered pixels (SPEC §1.2). A checkpoint whose decoder head is ours
    with its rows put in that order loads with --decoder_order cpq into the model it came from, weight for weight;
    read as (p, q, c) it would scramble the reconstruction."""
    full = torch.load(checkpoints['full'], weights_only=True)
    p, c = 8, 3  # mae_vit_test
    w, b = full['model']['decoder_pred.weight'], full['model']['decoder_pred.bias']
    # (p, q, c) rows -> (c, p, q): row (ci, pi, qi) of the MAE-priv head is our row (pi, qi, ci)
    perm = torch.arange(p * p * c).view(p, p, c).permute(2, 0, 1).reshape(-1)
    priv = {**full['model'], 'decoder_pred.weight': w[perm], 'decoder_pred.bias': b[perm]}
    path = str(tmp_path / 'mae_priv.pth')
    atomic_save({'model': priv, 'args': full['args']}, path)
    args = main_analyze.get_args_parser().parse_args(['recon', '--weights', path, '--decoder_order', 'cpq',
                                                      *common(checkpoints, tmp_path)])
    args.input_size = 32  # what main() reads from the checkpoint before loading
    model, _ = main_analyze.load_masked_autoencoder(path, args)
    torch.testing.assert_close(model.decoder_pred.weight, w, rtol=0, atol=0)
    torch.testing.assert_close(model.decoder_pred.bias, b, rtol=0, atol=0)
    args.decoder_order = 'pqc'
    model, _ = main_analyze.load_masked_autoencoder(path, args)
    assert not torch.equal(model.decoder_pred.weight, w)
