"""main_knn.py: knn_classify against a brute-force per-sample loop, tiny test sets, and runs through main(args)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import main_knn
from main_knn import knn_classify
from test_linprobe import make_color_folder


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny models, one thread


def brute_force(train, train_labels, test, num_classes, k, T):
    """One test sample at a time, in float64 and plain Python: the class votes of SPEC §4.2."""
    out = []
    for q in test.double():
        sims = [(float(q @ x), j) for j, x in enumerate(train.double())]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, j in sims[:min(k, len(sims))]:
            votes[int(train_labels[j])] += float(torch.tensor(s / T, dtype=torch.float64).exp())
        out.append(votes)
    return torch.tensor(out, dtype=torch.float64)  # [M, C]


@pytest.mark.parametrize('k,T,chunk', [(1, 0.07, 7), (3, 0.07, 100), (10, 0.07, 7), (20, 0.5, 4), (200, 0.07, 7)])
def test_matches_brute_force(k, T, chunk):
    g = torch.Generator().manual_seed(k)
    N, M, D, C = 50, 23, 8, 6
    train = F.normalize(torch.randn(N, D, generator=g), dim=1)
    test = F.normalize(torch.randn(M, D, generator=g), dim=1)
    train_labels = torch.randint(0, C, (N,), generator=g)
    test_labels = torch.randint(0, C, (M,), generator=g)
    r = knn_classify(train, train_labels, test, C, k, T, chunk, test_labels)
    votes = brute_force(train, train_labels, test, C, k, T)  # [M, C]
    n_pred = min(5, k, C)
    assert r['k'] == min(k, N) and r['pred'].shape == (M, n_pred)
    # the predicted classes carry the largest votes, in decreasing order (compare values: robust to exact ties)
    top_votes = votes.sort(dim=1, descending=True).values[:, :n_pred]
    torch.testing.assert_close(votes.gather(1, r['pred']), top_votes, rtol=1e-5, atol=0)
    assert torch.equal(r['pred'][:, 0], votes.argmax(dim=1))
    hit = r['pred'] == test_labels[:, None]
    expect1 = 100 * float((votes.argmax(dim=1) == test_labels).double().mean())
    expect5 = 100 * float(hit.any(dim=1).double().mean())
    assert r['top1'] == pytest.approx(expect1) and r['top5'] == pytest.approx(expect5)


def test_weights_beat_majority():
    """One very close neighbour of class 0 outvotes two moderately close ones of class 1 at T = 0.07."""
    train = torch.tensor([[1.0, 0.0], [0.5, 0.75 ** 0.5], [0.5, -0.75 ** 0.5]])  # cos 0.99 / 0.5 / 0.5 to q
    q = F.normalize(torch.tensor([[1.0, 0.142]]), dim=1)
    r = knn_classify(train, torch.tensor([0, 1, 1]), q, 2, k=3, T=0.07, test_labels=torch.tensor([0]))
    assert r['pred'][0, 0] == 0 and r['top1'] == 100.0
    r = knn_classify(train, torch.tensor([0, 1, 1]), q, 2, k=3, T=100.0)  # nearly uniform weights: majority wins
    assert r['pred'][0, 0] == 1


def test_seven_test_images_ten_train_images_k20():
    """DINO's chunking divides by zero below 100 test images; k larger than the train set is clipped."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=1) * 10
    train_labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    test_labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    train = F.normalize(centres[train_labels] + torch.randn(10, 16, generator=g), dim=1)
    test = F.normalize(centres[test_labels] + torch.randn(7, 16, generator=g), dim=1)
    r = knn_classify(train, train_labels, test, 3, k=20, T=0.07, chunk=256, test_labels=test_labels)
    assert r['k'] == 10
    assert r['top1'] == 100.0 and r['top5'] == 100.0
    assert r['pred'].shape == (7, 3)  # top-5 over min(5, k, classes) = 3 guesses
    assert torch.equal(r['pred'][:, 0], test_labels)


def knn_args(root, out, *argv):
    return main_knn.get_args_parser().parse_args([
        '--data_path', str(root), '--output_dir', str(out), '--model', 'vit_test', '--input_size', '32',
        '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--print_freq', '100', *argv])


def test_main_on_tiny_data_and_feature_cache(tmp_path):
    """10 train / 7 val images of 3 colours: every k reported and clipped to 10, log.txt matches the return value,
    colour classes are found by a random-init ViT; the cache is reused, and refreshed for another --feature."""
    root = make_color_folder(tmp_path / 'data', n_train=(4, 3, 3), n_val=(3, 2, 2))
    out = tmp_path / 'knn'
    os.makedirs(out)
    cache = tmp_path / 'cache'
    m = main_knn.main(knn_args(root, out, '--feature_cache', str(cache)))
    assert m['n_train'] == 10 and m['n_test'] == 7
    for k in (10, 20, 100, 200):
        assert m[f'knn{k}_k_used'] == 10
        assert 0.0 <= m[f'test_knn{k}_acc1'] <= m[f'test_knn{k}_acc5'] <= 100.0
    assert m['test_knn20_acc1'] >= 100 * 5 / 7  # chance is 1/3; solid colours are trivially separable
    with open(out / 'log.txt') as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1 and rows[0]['test_knn20_acc1'] == m['test_knn20_acc1']
    assert (cache / 'train.pth').is_file() and (cache / 'val.pth').is_file()

    saved = torch.load(cache / 'train.pth', weights_only=True)
    saved['feats'] = -saved['feats']  # a doctored cache proves the second run reads it instead of recomputing
    torch.save(saved, cache / 'train.pth')
    m2 = main_knn.main(knn_args(root, out, '--feature_cache', str(cache), '--nb_knn', '1'))
    val = torch.load(cache / 'val.pth', weights_only=True)
    doctored = knn_classify(saved['feats'], saved['labels'], val['feats'], 3, 1, test_labels=val['labels'])
    honest = knn_classify(-saved['feats'], saved['labels'], val['feats'], 3, 1, test_labels=val['labels'])
    assert doctored['top1'] != honest['top1']  # so the next line tells which features the run used
    assert m2['test_knn1_acc1'] == pytest.approx(doctored['top1'])
    m3 = main_knn.main(knn_args(root, out, '--feature_cache', str(cache), '--feature', 'avg'))
    refreshed = torch.load(cache / 'train.pth', weights_only=True)
    assert refreshed['meta']['feature'] == 'avg' and not torch.equal(refreshed['feats'], saved['feats'])
    assert refreshed['feats'].norm(dim=1).sub(1).abs().max() < 1e-5  # L2-normalised
    assert m3['feature'] == 'avg'
