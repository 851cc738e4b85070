"""Datasets by name (util/datasets.py): folder, demo, CIFAR from pickle batches, iNaturalist json, missing roots."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import make_image_folder
from util import datasets
from util.data import collate_skip
from util.datasets import build_dataset


def write_cifar10(root, n=4):
    """A fake CIFAR-10 in torchvision's python layout: 5 train batches + test batch of n images each."""
    base = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(base)
    rng = np.random.default_rng(0)
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    for b, name in enumerate(names):
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # rows are [R plane | G plane | B plane]
        labels = [(b + i) % 10 for i in range(n)]
        if b == 0:  # image 0: pure red, with a green pixel at (row 1, col 2)
            img = np.zeros((3, 32, 32), np.uint8)
            img[0] = 255
            img[1, 1, 2] = 200
            data[0] = img.reshape(-1)
        with open(os.path.join(base, name), 'wb') as f:
            pickle.dump({'data': data, 'labels': labels, 'batch_label': name}, f)
    with open(os.path.join(base, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': [f'c{i}' for i in range(10)], 'num_cases_per_batch': n}, f)
    return str(root)


def test_fake_cifar10(tmp_path):
    root = write_cifar10(tmp_path / 'cifar', n=4)
    train, nb = build_dataset('cifar10', root, True, None)
    test, nb_test = build_dataset('cifar10', root, False, None)
    assert nb == nb_test == 10
    assert len(train) == 20 and len(test) == 4
    img, target = train[0]
    assert img.size == (32, 32) and img.mode == 'RGB'
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert img.getpixel((2, 1)) == (255, 200, 0)  # PIL (x, y) = (col, row): the CHW -> HWC order is right
    assert [train[i][1] for i in range(4)] == [0, 1, 2, 3]
    assert train[4][1] == 1  # first image of data_batch_2
    # the root may also be the batches folder itself
    same, _ = build_dataset('cifar10', os.path.join(root, 'cifar-10-batches-py'), True, None)
    assert len(same) == 20


def test_fake_cifar100(tmp_path):
    base = tmp_path / 'cifar-100-python'
    base.mkdir()
    for name, n in (('train', 6), ('test', 3)):
        data = np.zeros((n, 3072), np.uint8)
        with open(base / name, 'wb') as f:
            pickle.dump({'data': data, 'fine_labels': [99 - i for i in range(n)], 'coarse_labels': [0] * n}, f)
    with open(base / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': [f'f{i}' for i in range(100)], 'coarse_label_names': ['x'] * 20}, f)
    ds, nb = build_dataset('cifar100', str(tmp_path), True, transforms.ToTensor())
    assert nb == 100 and len(ds) == 6
    images, targets, skipped = collate_skip([ds[0], ds[1]])
    assert images.shape == (2, 3, 32, 32) and targets.tolist() == [99, 98] and skipped == 0
    test, _ = build_dataset('cifar100', str(tmp_path), False, None)
    assert len(test) == 3


def test_folder(tmp_path):
    root = make_image_folder(tmp_path / 'data', n_per_class=3, classes=('x', 'y', 'z'))
    ds, nb = build_dataset('folder', root, True, transforms.ToTensor())
    assert nb == 3 and len(ds) == 9
    images, targets, _ = collate_skip([ds[i] for i in range(len(ds))])
    assert sorted(set(targets.tolist())) == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match='val'):  # no val/ split written
        build_dataset('imagenet', root, False, None)


def test_demo(demo_dir):
    ds, nb = build_dataset('demo', '', True, None)
    val, _ = build_dataset('demo', '', False, None)
    assert nb == 10
    assert (len(ds), len(val)) == (1437, 360)
    img, target = val[0]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and 0 <= target < 10


def test_inat_json(tmp_path):
    root = tmp_path / 'inat'
    files = []
    for i in range(4):
        path = root / 'train_val' / f'{i}.jpg'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (12, 10), (i * 40, 0, 0)).save(path)
        files.append(f'train_val/{i}.jpg')
    categories = [{'id': 17, 'name': 'b'}, {'id': 5, 'name': 'a'}, {'id': 30, 'name': 'c'}]
    train = {'images': [{'id': 10 + i, 'file_name': files[i]} for i in range(3)],
             'annotations': [{'id': i, 'image_id': 10 + i, 'category_id': c} for i, c in enumerate((17, 5, 17))],
             'categories': categories}
    val = {'images': [{'id': 99, 'file_name': files[3]}], 'annotations': [{'id': 0, 'image_id': 99, 'category_id': 30}],
           'categories': categories}
    (root / 'train2018.json').write_text(json.dumps(train))
    (root / 'val2018.json').write_text(json.dumps(val))
    ds, nb = build_dataset('inat', str(root), True, None)
    assert nb == 3 and len(ds) == 3
    assert [ds[i][1] for i in range(3)] == [1, 0, 1]  # ids 5, 17, 30 -> 0, 1, 2
    assert ds[0][0].getpixel((0, 0)) == (0, 0, 0)
    val_ds, _ = build_dataset('inat', str(root), False, None)
    assert len(val_ds) == 1 and val_ds[0][1] == 2
    os.remove(root / 'train_val' / '1.jpg')  # unreadable images become None, which collate_skip drops
    assert ds[1] is None
    _, _, skipped = collate_skip([ds[1], (np.zeros(1), 0)])
    assert skipped == 1


@pytest.mark.parametrize('name', ['cifar10', 'folder', 'flowers102', 'pets', 'cars', 'inat'])
def test_missing_root_names_flag_and_path(tmp_path, name):
    missing = str(tmp_path / 'no_such_dir')
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(name, missing, True, None)
    assert '--data_path' in str(e.value) and missing in str(e.value)
    assert not os.path.exists(missing)  # nothing created, nothing downloaded


@pytest.mark.parametrize('name', ['cifar10', 'flowers102', 'pets', 'aircraft', 'cars', 'inat'])
def test_empty_root_names_flag_and_path(tmp_path, name):
    empty = str(tmp_path / 'empty')
    os.makedirs(empty)
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(name, empty, True, None)
    assert '--data_path' in str(e.value) and empty in str(e.value)
    assert os.listdir(empty) == []


def test_unknown_name():
    with pytest.raises(ValueError, match='cifar100'):
        build_dataset('cifar1000', '/tmp', True, None)


def test_transfer_datasets_take_mae_lites_splits(tmp_path, monkeypatch):
    """The fine-grained transfer sets use the splits and label levels of MAE-Lite's transfer runs: Flowers-102 trains
    on train + val (10 + 10 images per class), Pets on trainval with the 37 breeds, Aircraft on trainval at the 100
    variants, Cars on its train split (196 classes; no download exists). torchvision's classes are replaced by
    recorders, so this checks what is asked of them."""
    calls = []

    def recorder(name, size):
        def make(root, **kw):
            calls.append((name, {k: v for k, v in kw.items() if k not in ('transform', 'download')}))
            return torch.utils.data.TensorDataset(torch.zeros(size))
        return make

    monkeypatch.setattr(datasets.tvd, 'Flowers102', recorder('flowers', 10))
    monkeypatch.setattr(datasets.tvd, 'OxfordIIITPet', recorder('pets', 3))
    monkeypatch.setattr(datasets.tvd, 'FGVCAircraft', recorder('aircraft', 3))
    monkeypatch.setattr(datasets.tvd, 'StanfordCars', recorder('cars', 3))
    (tmp_path / 'x').mkdir()
    (tmp_path / 'x' / 'anything').write_text('')  # a non-empty root
    root = str(tmp_path / 'x')
    ds, n = build_dataset('flowers102', root, True, None)
    assert n == 102 and len(ds) == 20 and [c[1]['split'] for c in calls] == ['train', 'val']
    calls.clear()
    assert build_dataset('flowers102', root, False, None)[1] == 102 and calls == [('flowers', {'split': 'test'})]
    calls.clear()
    assert build_dataset('pets', root, True, None)[1] == 37
    assert build_dataset('pets', root, False, None)[1] == 37
    assert calls == [('pets', {'split': 'trainval', 'target_types': 'category'}),
                     ('pets', {'split': 'test', 'target_types': 'category'})]
    calls.clear()
    assert build_dataset('aircraft', root, True, None)[1] == 100
    assert calls == [('aircraft', {'split': 'trainval', 'annotation_level': 'variant'})]
    calls.clear()
    assert build_dataset('cars', root, True, None)[1] == 196 and calls == [('cars', {'split': 'train'})]
    with pytest.raises(ValueError, match='Stanford Cars cannot be downloaded'):
        build_dataset('cars', root, True, None, download=True)
