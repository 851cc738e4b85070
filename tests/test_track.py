"""track/: OPE metrics by hand, candidate elimination, crop round trips, inference map-back, and a short demo training
that must track the moving digit far better than standing still."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import models_vit
from track import data as tdata
from track import ope
from track.model import (build_tracker, centre_tokens, eliminate_candidates, gaussian_heatmap,
                         keep_ratio_at, ostrack_test, tracking_loss)
from track.tracker import Tracker, clip_box, stay_still


class Seq:
    def __init__(self, name, boxes, visible=None):
        self.name, self.boxes = name, np.asarray(boxes, dtype=np.float64)
        self.visible = np.ones(len(boxes), bool) if visible is None else np.asarray(visible)


# ---------------------------------------------------------------------------------------------------------------
# OPE

def test_perfect_tracker():
    """Predictions equal to the ground truth: precision and normalised precision 100; AUC 100 with IoU >= t, and
    100 * 100/101 under the pytracking/OSTrack strict test IoU > t (the 1.0 threshold can never be passed)."""
    rng = np.random.default_rng(0)
    seqs = [Seq(f's{i}', np.c_[rng.uniform(0, 50, (20, 2)), rng.uniform(5, 30, (20, 2))]) for i in range(3)]
    preds = {s.name: s.boxes.copy() for s in seqs}
    strict = ope.evaluate(preds, seqs)
    assert strict['overall']['auc'] == pytest.approx(100 * 100 / 101)
    assert strict['overall']['precision'] == pytest.approx(100)
    assert strict['overall']['norm_precision'] == pytest.approx(100)
    inclusive = ope.evaluate(preds, seqs, strict=False)
    assert inclusive['overall']['auc'] == pytest.approx(100)
    for r in inclusive['per_sequence'].values():
        assert r['auc'] == pytest.approx(100) and r['mean_iou'] == pytest.approx(1)


def test_known_shift_hand_computed():
    """Ground truth (10, 10, 20, 20) on 10 frames; prediction shifted by (6, 8) px on frames 1-9 (frame 0 is always
    the ground truth). IoU = 14*12 / (800 - 168) = 0.2658, centre error 10 px, normalised 0.5.
    Success(t) = 1 for t <= 0.26 (27 thresholds), 0.1 (frame 0 only) for 0.27..0.99 (73), 0 at 1.0:
    AUC = (27 + 7.3) / 101 = 33.96 %. Precision@20: 100 %. Normalised precision@0.2: frame 0 only, 10 %.
    A second sequence shifted by 30 px (IoU 0, which fails even t = 0) has success 0.1 on t = 0..0.99:
    AUC 100 * 0.1 / 101 = 9.90 %, precision 10 %."""
    gt = np.tile([10.0, 10.0, 20.0, 20.0], (10, 1))
    near, far = gt + [6, 8, 0, 0], gt + [30, 0, 0, 0]
    r = ope.evaluate({'near': near, 'far': far}, [Seq('near', gt), Seq('far', gt)])
    n, f = r['per_sequence']['near'], r['per_sequence']['far']
    assert n['auc'] == pytest.approx(100 * 34.3 / 101)
    assert n['precision'] == pytest.approx(100) and n['norm_precision'] == pytest.approx(10)
    assert n['mean_iou'] == pytest.approx((1 + 9 * 168 / 632) / 10)
    assert f['auc'] == pytest.approx(100 * 10 / 101)
    assert f['precision'] == pytest.approx(10) and f['norm_precision'] == pytest.approx(10)
    # overall = mean of the per-sequence curves
    assert r['overall']['auc'] == pytest.approx((n['auc'] + f['auc']) / 2)
    assert r['overall']['precision'] == pytest.approx(55)


def test_invalid_frames_fail_and_count():
    """A frame with no valid box (w = 0) or flagged invisible fails every threshold but stays in the denominator
    (pytracking's default); with exclude_invalid it leaves the denominator."""
    gt = np.tile([10.0, 10.0, 20.0, 20.0], (4, 1))
    gt[2, 2] = 0
    seq = Seq('s', gt, visible=[1, 1, 1, 0])
    c = ope.sequence_curves(gt.copy(), seq.boxes, seq.visible)
    assert c['success'][0] == pytest.approx(0.5) and c['precision'][20] == pytest.approx(0.5)
    c = ope.sequence_curves(gt.copy(), seq.boxes, seq.visible, exclude_invalid=True)
    assert c['success'][0] == pytest.approx(1.0) and c['n_frames'] == 2


def test_auc_is_mean_success_over_101_thresholds():
    """The AUC equals the success rate averaged over t = 0, 0.01, ..., 1 computed frame by frame here, and so is
    within 1.01 points of the mean IoU (the integral it approximates)."""
    rng = np.random.default_rng(1)
    gt = np.c_[rng.uniform(0, 100, (200, 2)), rng.uniform(10, 40, (200, 2))]
    pred = gt + np.c_[rng.normal(0, 8, (200, 2)), rng.normal(0, 4, (200, 2))]
    pred[:, 2:] = np.abs(pred[:, 2:]) + 1
    r = ope.evaluate({'s': pred}, [Seq('s', gt)])
    ious = [1.0] + [_iou(pred[i], gt[i]) for i in range(1, 200)]
    by_hand = np.mean([np.mean([iou > k / 100 for iou in ious]) for k in range(101)])
    assert len(r['curves']['success']) == 101
    assert r['overall']['auc'] == pytest.approx(100 * by_hand)
    assert r['overall']['auc'] == pytest.approx(100 * np.mean(r['curves']['success']))
    assert abs(r['overall']['auc'] - 100 * np.mean(ious)) <= 1.01


def _iou(a, b):
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def test_plots_written(tmp_path):
    gt = np.tile([10.0, 10.0, 20.0, 20.0], (5, 1))
    r = ope.evaluate({'s': gt}, [Seq('s', gt)])
    paths = ope.plot_curves({'a': r}, str(tmp_path / 'x_'))
    assert [os.path.basename(p) for p in paths] == ['x_success.png', 'x_precision.png']
    for p in paths:
        assert Image.open(p).size[0] > 100


# ---------------------------------------------------------------------------------------------------------------
# model

def test_candidate_elimination_counts_and_map_back():
    """Two CE layers at keep 0.7 on an 8x8 search grid keep ceil(0.7*64) = 45, then ceil(0.7*45) = 32 distinct
    tokens; the search feature map handed to the head is zero exactly at the eliminated positions. With keep 1
    every token stays and no block leaves its fast attention path."""
    torch.manual_seed(0)
    model = ostrack_test().eval()
    seen = {}
    model.box_head.register_forward_hook(lambda m, inp, out: seen.update(feat=inp[0]))
    z, x = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 32, 32)
    out = model(z, x)
    keep = out['keep_index']
    assert keep.shape == (3, 32)
    for row in keep:
        assert len(set(row.tolist())) == 32 and int(row.max()) < 64
    feat = seen['feat']  # [N, D, 8, 8]
    assert feat.shape == (3, 32, 8, 8)
    nonzero = feat.flatten(2).abs().sum(1) > 0  # [N, 64]
    expected = torch.zeros(3, 64, dtype=torch.bool).scatter(1, keep, True)
    assert torch.equal(nonzero, expected)
    assert out['score_map'].shape == (3, 1, 8, 8) and out['boxes'].shape == (3, 4)
    full = model(z, x, keep_ratio=1.0)
    assert full['keep_index'].shape == (3, 64) and (seen['feat'].flatten(2).abs().sum(1) > 0).all()


def test_elimination_keeps_what_the_template_centre_attends_to():
    """Search tokens ranked by the template-centre row of the attention: the planted favourites are kept."""
    N, H, Lt, Ls, D = 2, 2, 4, 10, 8
    tokens = torch.randn(N, Lt + Ls, D)
    logits = torch.zeros(N, H, Lt + Ls, Lt + Ls)
    favourites = torch.tensor([[7, 2, 9], [0, 5, 3]])
    for n in range(N):
        logits[n, :, 1, Lt + favourites[n]] = torch.tensor([5.0, 4.0, 3.0])  # token 1 is the "centre"
    keep_index = torch.arange(Ls).expand(N, Ls) + 100  # global positions, carried along
    out, idx = eliminate_candidates(tokens, logits, keep_index, Lt, [1], keep_ratio=0.3)
    assert out.shape == (N, Lt + 3, D)
    assert torch.equal(idx, favourites + 100)
    assert torch.equal(out[:, :Lt], tokens[:, :Lt])
    assert torch.equal(out[0, Lt:], tokens[0, Lt + favourites[0]])
    assert centre_tokens((8, 8)) == [27, 28, 35, 36] and centre_tokens((7, 7)) == [24]


def test_keep_ratio_schedule():
    assert keep_ratio_at(0, 0.7, 20, 80) == 1.0 and keep_ratio_at(19, 0.7, 20, 80) == 1.0
    assert keep_ratio_at(20, 0.7, 20, 80) == pytest.approx(1.0)
    assert keep_ratio_at(60, 0.7, 20, 80) == pytest.approx(0.85)
    assert keep_ratio_at(100, 0.7, 20, 80) == 0.7 and keep_ratio_at(299, 0.7, 20, 80) == 0.7
    ratios = [keep_ratio_at(e, 0.7, 20, 80) for e in range(20, 101)]
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))


def test_backward_reaches_every_parameter_and_pos_embeds_interpolated():
    """Every parameter gets a gradient from the tracking loss; the template/search position embeddings are the
    backbone's grid resized to 4x4 and 8x8 (here the backbone grid is 8x8, so the search one is a copy)."""
    torch.manual_seed(0)
    vit_model = build_tracker('vit_test', patch_size=4, template_size=16, search_size=32, ce_layers=(0,),
                              head_channels=16)
    assert vit_model.pos_embed_z.shape == (1, 16, 32) and vit_model.pos_embed_x.shape == (1, 64, 32)
    out = vit_model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 32, 32))
    loss, metrics = tracking_loss(out, torch.tensor([[0.5, 0.5, 0.25, 0.3]]).repeat(4, 1))
    loss.backward()
    missing = [n for n, p in vit_model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert set(metrics) == {'focal', 'giou', 'l1', 'iou'} and torch.isfinite(loss)


def test_pretrained_weights_load(tmp_path):
    """A timm-layout ViT checkpoint (with head and cls row) initialises the tracker's blocks and pos-embeds."""
    import models_vit
    torch.manual_seed(0)
    vit = models_vit.vit_test(patch_size=4)  # 8x8 grid + cls
    path = tmp_path / 'vit.pth'
    torch.save({'model': vit.state_dict()}, path)
    t = build_tracker('vit_test', str(path), patch_size=4, template_size=16, search_size=32, head_channels=16)
    assert torch.equal(t.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert torch.equal(t.pos_embed_x, vit.pos_embed[:, 1:])  # same 8x8 grid
    expected_z = torch.nn.functional.interpolate(vit.pos_embed[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2),
                                                 size=(4, 4), mode='bicubic', align_corners=False)
    torch.testing.assert_close(t.pos_embed_z, expected_z.permute(0, 2, 3, 1).reshape(1, 16, 32))


def test_heatmap_peaks_in_the_centre_cell():
    hm = gaussian_heatmap(torch.tensor([[0.30, 0.70, 0.2, 0.2]]), (8, 8))
    assert hm.shape == (1, 1, 8, 8) and hm[0, 0, 5, 2] == 1 and (hm == 1).sum() == 1


# ---------------------------------------------------------------------------------------------------------------
# crops and inference

def test_crop_uncrop_round_trip():
    """Boxes mapped into a crop and back are unchanged, for crops that are cut by the image border too."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        box = np.r_[rng.uniform(-20, 200, 2), rng.uniform(1, 80, 2)]
        other = np.r_[rng.uniform(-20, 200, 2), rng.uniform(1, 80, 2)]
        tf = tdata.crop_transform(box, rng.choice([2.0, 4.0]), int(rng.choice([16, 128, 256])))
        np.testing.assert_allclose(tdata.box_from_crop(tdata.box_to_crop(other, tf), tf), other, atol=1e-9)
        t = torch.tensor(other)
        torch.testing.assert_close(tdata.box_from_crop(tdata.box_to_crop(t, tf), tf), t)


def test_crop_pixels_follow_the_transform():
    """A white rectangle cropped with factor 4 to 64 px lands where box_to_crop says: its inside is white, a ring
    around it black; the target sits in the middle at a quarter of the crop's side."""
    img = np.zeros((200, 300, 3), np.uint8)
    box = np.array([180.0, 30.0, 40.0, 40.0])
    img[30:70, 180:220] = 255
    c, tf = tdata.crop(Image.fromarray(img), box, 4.0, 64)
    x, y, w, h = tdata.box_to_crop(box, tf)
    np.testing.assert_allclose([x, y, w, h], [24, 24, 16, 16])
    a = np.asarray(c)[..., 0].astype(float)
    assert a[26:38, 26:38].min() == 255
    assert a[20:22, :].max() == 0 and a[42:44, :].max() == 0 and a[:, 20:22].max() == 0


def test_tracker_maps_the_peak_back_to_the_image():
    """A stand-in model whose score map peaks at cell (row 2, col 5) with offset 0.5 and size 0.25: the tracker
    reports the box centred at ((5.5/8) * 64 px of crop) mapped back through the search crop's transform."""
    class Stub(torch.nn.Module):
        template_size, search_size, grid_x = 16, 64, (8, 8)
        background, peak = 0.1, (2, 5)

        def forward(self, z, x, keep_ratio=None):
            score = torch.full((1, 1, 8, 8), self.background)
            score[0, 0][self.peak] = 0.9
            return dict(score_map=score, offset_map=torch.full((1, 2, 8, 8), 0.5),
                        size_map=torch.full((1, 2, 8, 8), 0.25))

    img = Image.new('RGB', (200, 200))
    tracker = Tracker(Stub())
    box0 = np.array([90.0, 90.0, 20.0, 20.0])  # search crop: side 80 px from (60, 60), scale 64/80
    tracker.initialize(img, box0)
    box = tracker.track(img)
    cx, cy, w = 60 + 5.5 / 8 * 80, 60 + 2.5 / 8 * 80, 0.25 * 80
    np.testing.assert_allclose(box, [cx - w / 2, cy - w / 2, w, w], atol=1e-4)
    # OSTrack's Hanning window, 0.5 (1 - cos(2 pi k / 9)) for k = 1..8 per axis: highest in the centre, positive on
    # the border, so a target in a border cell is still found
    k = torch.arange(1, 9, dtype=torch.float64)
    hann = 0.5 * (1 - torch.cos(2 * math.pi * k / 9))
    torch.testing.assert_close(tracker.window[0, 0].double(), torch.outer(hann, hann), atol=1e-6, rtol=0)
    assert tracker.window[0, 0, 0, 0] > 0 and tracker.window[0, 0, 3:5, 3:5].min() > 0.8
    tracker.model.background, tracker.model.peak = 0.0, (0, 7)
    tracker.initialize(img, box0)
    box = tracker.track(img)  # the only peak sits in the top-right corner cell
    np.testing.assert_allclose(box[:2] + box[2:] / 2, [60 + 7.5 / 8 * 80, 60 + 0.5 / 8 * 80], atol=1e-4)
    np.testing.assert_allclose(clip_box(np.array([-50.0, 10, 20, 20]), 100, 100), [0, 10, 10, 20])
    np.testing.assert_allclose(clip_box(np.array([-50.0, -60, 400, 300]), 100, 80), [0, 0, 100, 80])


def test_sequence_layouts(tmp_path):
    """LaSOT (occlusion flags), GOT-10k (absence.label) and TrackingNet (numeric frame order) readers."""
    frame = Image.new('RGB', (8, 8))
    d = tmp_path / 'lasot' / 'cat' / 'cat-1' / 'img'
    os.makedirs(d)
    for i in range(3):
        frame.save(d / f'{i + 1:08d}.jpg')
    (d.parent / 'groundtruth.txt').write_text('1,2,3,4\n1,2,3,4\n1,2,3,4\n')
    (d.parent / 'full_occlusion.txt').write_text('0,1,0')
    (d.parent / 'out_of_view.txt').write_text('0,0,1')
    [s] = tdata.load_sequences('lasot', str(tmp_path / 'lasot'))
    assert s.name == 'cat-1' and len(s) == 3 and s.visible.tolist() == [True, False, False]
    g = tmp_path / 'got' / 'val' / 'GOT-10k_Val_000001'
    os.makedirs(g)
    for i in range(2):
        frame.save(g / f'{i + 1:08d}.jpg')
    (g / 'groundtruth.txt').write_text('1,2,3,4\n0,0,0,0\n')
    (g / 'absence.label').write_text('0\n1\n')
    [s] = tdata.load_got10k(str(tmp_path / 'got'), 'val')
    assert s.visible.tolist() == [True, False]
    t = tmp_path / 'tn'
    os.makedirs(t / 'TRAIN_0' / 'frames' / 'v')
    os.makedirs(t / 'TRAIN_0' / 'anno')
    for i in range(11):
        frame.save(t / 'TRAIN_0' / 'frames' / 'v' / f'{i}.jpg')
    (t / 'TRAIN_0' / 'anno' / 'v.txt').write_text('1,2,3,4\n' * 11)
    [s] = tdata.load_sequences('trackingnet', str(t))
    assert [os.path.basename(f) for f in s.frames[:3]] == ['0.jpg', '1.jpg', '2.jpg'] and len(s) == 11


# ---------------------------------------------------------------------------------------------------------------
# the demo, end to end

@pytest.fixture(scope='module')
def demo_sequences(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('track') / 'digits')
    tdata.materialise_demo_sequences(root, n_train=24, n_val=6)
    return root


def test_demo_sequences(demo_sequences):
    train = tdata.load_got10k(demo_sequences, 'train')
    val = tdata.load_got10k(demo_sequences, 'val')
    assert (len(train), len(val)) == (24, 6) and all(len(s) == 40 for s in val)
    s = val[0]
    assert s.visible.all() and (s.boxes[:, 2:] >= 8).all()
    a = np.asarray(Image.open(s.frames[5]), dtype=float)
    x, y, w, h = s.boxes[5].astype(int)
    assert a[y:y + h, x:x + w].max() > a.mean() + 60  # the digit's strokes are brighter than the background


def demo_training_args(root, out, seed=0):
    """The test's short demo training: the tiny vit_test blocks with patch 4 on 16/32 px crops, 10 x 512 pairs in
    batches of 16 (more, smaller steps learn faster than fewer large ones at equal compute)."""
    from track import train
    return train.get_args_parser().parse_args([
        '--train_sets', f'got10k:{os.path.join(root, "train")}', '--eval_sets', f'got10k:{os.path.join(root, "val")}',
        '--model', 'vit_test', '--patch_size', '4', '--template_size', '16', '--search_size', '32',
        '--head_channels', '32', '--ce_layers', '0,1', '--ce_start_epoch', '2', '--ce_warm_epochs', '3',
        '--batch_size', '16', '--samples_per_epoch', '512', '--epochs', '10', '--lr_drop_epoch', '8',
        '--lr', '2e-3', '--backbone_lr_scale', '1', '--drop_path', '0', '--num_workers', '0', '--device', 'cpu',
        '--print_freq', '100', '--output_dir', str(out), '--eval_freq', '0', '--seed', str(seed)])


def test_demo_training_tracks_the_digit(demo_sequences, tmp_path):
    """A short training (320 steps of 16 pairs) on the demo sequences tracks the moving digit on unseen val sequences with an
    AUC well above the stay-still baseline, and writes checkpoints and a log whose loss falls."""
    from track import train
    out = tmp_path / 'run'
    os.makedirs(out)
    _, results = train.main(demo_training_args(demo_sequences, out))
    rows = [json.loads(line) for line in open(out / 'log.txt')]
    assert [r['epoch'] for r in rows] == list(range(10))
    assert rows[-1]['train_loss'] < rows[0]['train_loss']
    assert [r['train_keep_ratio'] for r in rows][:2] == [1.0, 1.0] and rows[-1]['train_keep_ratio'] == 0.7
    assert rows[-1]['test_auc'] == pytest.approx(results['overall']['auc'])
    val = tdata.load_got10k(demo_sequences, 'val')
    baseline = ope.evaluate({s.name: stay_still(s) for s in val}, val)['overall']['auc']
    auc = results['overall']['auc']
    assert auc > baseline + AUC_MARGIN, (auc, baseline)
    assert (out / 'checkpoint-last.pth').is_file()


AUC_MARGIN = 15.0  # AUC points over stay-still (11.7 here); seeds 0-3 measured 72.1, 67.7, 66.5, 35.4 (README)


def test_rerun_resumes_and_ends_as_an_uninterrupted_run(demo_sequences, tmp_path):
    """Rerunning the same command in the same folder continues from checkpoint-last.pth: 1 epoch, then --epochs 2,
    gives the weights, optimizer state and epoch-1 loss of one 2-epoch run (candidate elimination switched on in
    epoch 1, so the resumed epoch must also pick up the keep-ratio schedule)."""
    from track import train

    def run(out, epochs):
        args = demo_training_args(demo_sequences, out)
        args.epochs, args.samples_per_epoch, args.eval_sets = epochs, 64, None
        args.ce_start_epoch, args.ce_warm_epochs = 1, 0
        os.makedirs(out, exist_ok=True)
        train.main(args)
        return [json.loads(line) for line in open(out / 'log.txt')]

    log_a = run(tmp_path / 'a', 2)
    run(tmp_path / 'b', 1)
    log_b = run(tmp_path / 'b', 2)
    assert [r['epoch'] for r in log_b] == [0, 1] and log_b[1]['train_keep_ratio'] < 1.0
    assert log_b[1]['train_loss'] == pytest.approx(log_a[1]['train_loss'], abs=1e-6)
    a = torch.load(tmp_path / 'a' / 'checkpoint-last.pth', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'checkpoint-last.pth', weights_only=True)
    assert a['epoch'] == b['epoch'] == 1 and a['model'].keys() == b['model'].keys()
    for k in a['model']:
        torch.testing.assert_close(b['model'][k], a['model'][k], atol=1e-6, rtol=0, msg=k)
    for i, state in a['optimizer']['state'].items():
        torch.testing.assert_close(b['optimizer']['state'][i]['exp_avg'], state['exp_avg'], atol=1e-6, rtol=0)


def test_torchrun_two_ranks_train_identically_and_rank0_evaluates(demo_sequences, tmp_path):
    """track/train.py under `torchrun --nproc_per_node 2` (gloo): both ranks end with the same parameters, rank 0's
    checkpoint took 64 / (8 x 2) = 4 optimizer steps, and its evaluation (while rank 1 waits) is in the log."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ddp_track_worker.py')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port), worker,
           demo_sequences, str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True,
                          timeout=600)  # a guard against a hung rendezvous or barrier
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys()
    # the head's BatchNorm statistics are each rank's own (DDP hands rank 0's to the others before every forward,
    # and rank 0's are saved); every parameter must be identical
    differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert all(k.endswith(('running_mean', 'running_var')) for k in differ), differ
    assert 'blocks.0.attn.qkv.weight' in r0 and 'box_head.ctr.0.0.weight' in r0
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint-last.pth', weights_only=True)
    assert {float(state['step']) for state in ckpt['optimizer']['state'].values()} == {4.0}
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'log.txt')]
    assert len(rows) == 1 and 0 <= rows[0]['test_auc'] <= 100


def ostrack_center_head(sd, feat):
    """OSTrack's CenterPredictor in eval mode, read by key name from an exported state dict (lib/models/layers/head.py:
    conv1-4 = Conv2d + BatchNorm2d + ReLU, conv5 = 1x1 Conv2d; score and size through a clamped sigmoid)."""
    def branch(name):
        x = feat
        for i in range(1, 5):
            p = f'box_head.conv{i}_{name}.'
            x = torch.nn.functional.conv2d(x, sd[p + '0.weight'], sd[p + '0.bias'], padding=1)
            x = torch.nn.functional.batch_norm(x, sd[p + '1.running_mean'], sd[p + '1.running_var'], sd[p + '1.weight'],
                                               sd[p + '1.bias'], False, 0.0, 1e-5).relu()
        return torch.nn.functional.conv2d(x, sd[f'box_head.conv5_{name}.weight'], sd[f'box_head.conv5_{name}.bias'])

    def squash(t):
        return t.sigmoid().clamp(1e-4, 1 - 1e-4)

    return squash(branch('ctr')), branch('offset'), squash(branch('size'))


def test_ostrack_export_has_ostracks_keys_and_gives_the_same_boxes(tmp_path):
    """The exported checkpoint has exactly the keys OSTrack's network holds (hand-written list: VisionTransformerCE +
    CenterPredictor), and OSTrack's forward without candidate elimination, computed from the exported tensors by
    their names, gives our score, offset and size maps. A pre-trained encoder is refused, naming what is missing."""
    from track import export_ostrack
    torch.manual_seed(0)
    model = ostrack_test().eval()
    for m in model.modules():  # BatchNorm statistics that matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / 'checkpoint-last.pth'
    torch.save({'model': model.state_dict(), 'epoch': 3}, path)
    export_ostrack.main(export_ostrack.get_args_parser().parse_args([str(path), str(tmp_path / 'ostrack.pth')]))
    sd = torch.load(tmp_path / 'ostrack.pth', weights_only=True)['net']

    dim, depth = model.embed_dim, len(model.blocks)
    block = ('norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
             'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')
    bn = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    want = {'backbone.cls_token', 'backbone.pos_embed', 'backbone.pos_embed_z', 'backbone.pos_embed_x',
            'backbone.patch_embed.proj.weight', 'backbone.patch_embed.proj.bias', 'backbone.norm.weight',
            'backbone.norm.bias'}
    want |= {f'backbone.blocks.{i}.{k}' for i in range(depth) for k in block}
    for b in ('ctr', 'offset', 'size'):
        want |= {f'box_head.conv{i}_{b}.0.{k}' for i in range(1, 5) for k in ('weight', 'bias')}
        want |= {f'box_head.conv{i}_{b}.1.{k}' for i in range(1, 5) for k in bn}
        want |= {f'box_head.conv5_{b}.weight', f'box_head.conv5_{b}.bias'}
    assert set(sd) == want
    assert sd['backbone.pos_embed'].shape == (1, (224 // 4) ** 2 + 1, dim)
    assert sd['box_head.conv5_offset.weight'].shape[0] == 2 and sd['box_head.conv1_ctr.0.weight'].shape[1] == dim

    # OSTrack's tracking forward: template and search embedded with their own position tables, concatenated
    # (template first), the blocks, the norm; the search tokens as a map into the head. The backbone tensors go
    # through a timm-named ViT loaded strictly (OSTrack's ViT has timm's names).
    vit = models_vit.create_model('vit_test', num_classes=0, global_pool='token', patch_size=4, img_size=224)
    vit.load_state_dict({k[len('backbone.'):]: v for k, v in sd.items()
                         if k.startswith('backbone.') and not k.startswith('backbone.pos_embed_')}, strict=True)
    vit.eval()
    z, x = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(z, x, keep_ratio=1.0)
        t = torch.cat([vit.patch_embed(z) + sd['backbone.pos_embed_z'],
                       vit.patch_embed(x) + sd['backbone.pos_embed_x']], dim=1)
        for blk in vit.blocks:
            t = blk(t)
        search = vit.norm(t)[:, sd['backbone.pos_embed_z'].shape[1]:]  # [N, 64, D]
        score, offset, size = ostrack_center_head(sd, search.transpose(1, 2).reshape(2, dim, 8, 8))
    torch.testing.assert_close(score, ours['score_map'])
    torch.testing.assert_close(offset, ours['offset_map'])
    torch.testing.assert_close(size, ours['size_map'], atol=1e-4, rtol=0)  # OSTrack also clamps the size to 1e-4

    vit_ckpt = tmp_path / 'encoder.pth'
    torch.save({'model': vit.state_dict()}, vit_ckpt)
    with pytest.raises(ValueError, match='pos_embed_x'):
        export_ostrack.convert(str(vit_ckpt))


def test_tracking_loss_weights_focal_giou_and_l1_as_ostrack():
    """OSTrack's loss is focal + 2 x GIoU + 5 x L1 (SPEC §6.3); other weights are honoured."""
    torch.manual_seed(0)
    out = ostrack_test().eval()(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32), keep_ratio=1.0)
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.4, 0.6, 0.2, 0.2]])
    loss, m = tracking_loss(out, boxes)
    torch.testing.assert_close(loss.detach(), m['focal'] + 2 * m['giou'] + 5 * m['l1'])
    assert m['focal'] > 0 and m['giou'] > 0 and m['l1'] > 0
    loss3, _ = tracking_loss(out, boxes, weights=(0.0, 0.0, 1.0))
    torch.testing.assert_close(loss3.detach(), m['l1'])
