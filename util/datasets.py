"""Classification datasets by name, for fine-tuning and transfer, from a local root.

Nothing is downloaded unless the caller passes download=True (the scripts' `--download`). Every dataset returns
(PIL-image-after-transform, int target) items, or None for an unreadable image, as `util.data.collate_skip` expects.

Expected layouts under `root` (the scripts' `--data_path`):
  imagenet / folder  root/train/<class>/*.jpg and root/val/<class>/*.jpg (ImageNet style)
  demo               the embedded scikit-learn digits (root ignored; see util.data.demo_root)
  cifar10            root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (or root is that folder)
  cifar100           root/cifar-100-python/{train, test, meta} (or root is that folder)
  flowers102         root/flowers-102/{jpg/, imagelabels.mat, setid.mat}; train = trnid ∪ valid, test = tstid
  pets               root/oxford-iiit-pet/{images/, annotations/trainval.txt, annotations/test.txt}
  aircraft           root/fgvc-aircraft-2013b/data/... (variant level, 100 classes; trainval / test)
  cars               root/stanford_cars/{cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat,
                     cars_test_annos_withlabels.mat} — torchvision's StanfordCars layout (196 classes). The original
                     site is gone, so there is no --download; cars_test_annos_withlabels.mat comes from the devkit
                     mirrors (e.g. the Kaggle copy of the dataset).
  inat               iNaturalist json annotations: root/train*.json and root/val*.json (COCO style: `images` with
                     `id`/`file_name` relative to root, `annotations` with `image_id`/`category_id`, `categories`
                     with `id`), e.g. iNat 2018's train2018.json / val2018.json next to train_val2018/; or
                     torchvision's INaturalist 2021 layout: root/2021_train/ and root/2021_valid/.

References: MAE-Lite (transfer datasets), torchvision.datasets, iNaturalist competition annotation format.
"""
import glob
import json
import logging
import os
import pickle

import numpy as np
import torch.utils.data
from PIL import Image
from torchvision import datasets as tvd

from util.data import SafeImageFolder, demo_root, read_rgb

log = logging.getLogger(__name__)

# the flag that sets `root` in every script, named in errors
ROOT_FLAG = '--data_path'


class CIFAR(tvd.VisionDataset):
    """CIFAR-10/100 read from the python pickle batches (torchvision's layout, without its md5 check so re-packed
    copies load). Items are (PIL RGB 32x32, int)."""

    LAYOUT = {  # name: (folder, train files, test files, meta file, label key, class-name key)
        'cifar10': ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)], ['test_batch'], 'batches.meta',
                    'labels', 'label_names'),
        'cifar100': ('cifar-100-python', ['train'], ['test'], 'meta', 'fine_labels', 'fine_label_names'),
    }

    def __init__(self, root, name='cifar10', train=True, transform=None):
        super().__init__(root, transform=transform)
        folder, train_files, test_files, meta, label_key, names_key = self.LAYOUT[name]
        base = root if os.path.isfile(os.path.join(root, meta)) else os.path.join(root, folder)
        files = [os.path.join(base, f) for f in (train_files if train else test_files) + [meta]]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f'{name}: {ROOT_FLAG} {root} lacks {absent[0]} (expected {folder}/ with '
                                    f'{", ".join(train_files + test_files + [meta])}; pass --download to fetch it)')
        data, labels = [], []
        for f in files[:-1]:
            entry = _unpickle(f)
            data.append(np.asarray(entry['data'], dtype=np.uint8).reshape(-1, 3, 32, 32))  # [n, C, H, W]
            labels.extend(int(t) for t in entry[label_key])
        self.data = np.concatenate(data).transpose(0, 2, 3, 1)  # [N, H, W, C] for PIL
        self.targets = labels
        self.classes = list(_unpickle(files[-1])[names_key])

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _unpickle(path):
    with open(path, 'rb') as f:
        return pickle.load(f, encoding='latin1')  # the batches were pickled by Python 2


class JsonAnnotated(tvd.VisionDataset):
    """Images listed in a COCO-style json (iNaturalist): category ids are mapped to 0..C-1 in sorted id order, so
    the train and val files (which list the same categories) agree. Unreadable images give None."""

    def __init__(self, root, ann_file, transform=None):
        super().__init__(root, transform=transform)
        with open(ann_file) as f:
            ann = json.load(f)
        cat_ids = sorted(c['id'] for c in ann['categories'])
        self.cat_to_idx = {c: i for i, c in enumerate(cat_ids)}
        target_of = {a['image_id']: self.cat_to_idx[a['category_id']] for a in ann['annotations']}
        self.samples = [(os.path.join(root, im['file_name']), target_of[im['id']]) for im in ann['images']
                        if im['id'] in target_of]  # test files have no annotations: nothing to classify
        self.classes = cat_ids

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = read_rgb(path)
        if img is None:
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def _check_root(name, root, download):
    if not root:
        raise FileNotFoundError(f'dataset {name!r} needs {ROOT_FLAG} (the folder that holds it)')
    if download:
        os.makedirs(root, exist_ok=True)
    elif not os.path.isdir(root):
        raise FileNotFoundError(f'dataset {name!r}: {ROOT_FLAG} {root} does not exist (nothing is downloaded '
                                'unless --download is passed)')


def _torchvision(name, root, download, make):
    """Build a torchvision dataset, turning its 'not found' RuntimeError into one that names our flag and path."""
    try:
        return make(root, download)
    except RuntimeError as e:
        raise FileNotFoundError(f'dataset {name!r} not found under {ROOT_FLAG} {root} ({e}); see util/datasets.py '
                                'for the expected layout, or pass --download') from None


def _folder(name, root, train, transform, download, in_chans=3):
    split = os.path.join(root, 'train' if train else 'val')
    if not os.path.isdir(split):
        raise FileNotFoundError(f'dataset {name!r}: {ROOT_FLAG} {root} has no {"train" if train else "val"}/ '
                                f'folder ({split}); expected an ImageNet-style root/train/<class>/ and '
                                'root/val/<class>/')
    ds = SafeImageFolder(split, transform, in_chans)
    return ds, len(ds.classes)


def _demo(name, root, train, transform, download, in_chans=3):
    ds = SafeImageFolder(os.path.join(demo_root(), 'train' if train else 'val'), transform, in_chans)
    return ds, len(ds.classes)


def _cifar(name, root, train, transform, download):
    if download:
        cls = tvd.CIFAR10 if name == 'cifar10' else tvd.CIFAR100
        cls(root, train=train, download=True)
    ds = CIFAR(root, name, train, transform)
    return ds, len(ds.classes)


def _flowers(name, root, train, transform, download):
    def make(split):
        return _torchvision(name, root, download,
                            lambda r, d: tvd.Flowers102(r, split=split, transform=transform, download=d))
    if train:  # train and val are 10 images per class each; transfer recipes train on both
        return _concat([make('train'), make('val')]), 102
    return make('test'), 102


def _pets(name, root, train, transform, download):
    ds = _torchvision(name, root, download, lambda r, d: tvd.OxfordIIITPet(
        r, split='trainval' if train else 'test', target_types='category', transform=transform, download=d))
    return ds, 37


def _aircraft(name, root, train, transform, download):
    ds = _torchvision(name, root, download, lambda r, d: tvd.FGVCAircraft(
        r, split='trainval' if train else 'test', annotation_level='variant', transform=transform, download=d))
    return ds, 100


def _cars(name, root, train, transform, download):
    if download:
        raise ValueError('Stanford Cars cannot be downloaded (its original site is gone); place it under '
                         f'{ROOT_FLAG} as util/datasets.py describes')
    ds = _torchvision(name, root, False, lambda r, d: tvd.StanfordCars(
        r, split='train' if train else 'test', transform=transform))
    return ds, 196


def _inat(name, root, train, transform, download):
    prefix = 'train' if train else 'val'
    # shortest name first: train.json before train_mini.json
    jsons = sorted(glob.glob(os.path.join(root, f'{prefix}*.json')), key=lambda p: (len(p), p))
    if jsons:
        ds = JsonAnnotated(root, jsons[0], transform)
        log.info(f'inat: {jsons[0]}: {len(ds)} images, {len(ds.classes)} classes')
        return ds, len(ds.classes)
    version = '2021_train' if train else '2021_valid'
    if not download and not os.path.isdir(os.path.join(root, version)):
        raise FileNotFoundError(f'dataset {name!r}: {ROOT_FLAG} {root} has neither {prefix}*.json annotations nor '
                                f'torchvision\'s {version}/ folder')
    ds = _torchvision(name, root, download, lambda r, d: tvd.INaturalist(r, version=version, target_type='full',
                                                                          transform=transform, download=d))
    return ds, len(ds.all_categories)


def _concat(parts):
    return torch.utils.data.ConcatDataset(parts)


DATASETS = {'imagenet': _folder, 'folder': _folder, 'demo': _demo, 'cifar10': _cifar, 'cifar100': _cifar,
            'flowers102': _flowers, 'pets': _pets, 'aircraft': _aircraft, 'cars': _cars, 'inat': _inat}


def build_dataset(name, root, train, transform, download=False, in_chans=3):
    """A classification dataset by name.

    Args:
        name: one of DATASETS ('demo' ignores root).
        root: the local folder (`--data_path`); missing -> FileNotFoundError naming the flag and the path.
        train: the training split (True) or the evaluation split (False).
        transform: applied to each PIL image (each [C, H, W] tensor for .npy inputs).
        download: fetch through torchvision when absent (never otherwise).
        in_chans: input channels (--in_chans); other than 3 only for the folder layouts (`SafeImageFolder`).
    Returns: (dataset of (image, int target) items, number of classes).
    """
    if name not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}; valid names: {", ".join(sorted(DATASETS))}')
    if name != 'demo':
        _check_root(name, root, download)
    if in_chans != 3:
        if DATASETS[name] not in (_folder, _demo):
            raise ValueError(f'--in_chans {in_chans}: only the folder layouts (folder, imagenet, demo) read other '
                             f'channel counts; --dataset {name} is RGB')
        return DATASETS[name](name, root, train, transform, download, in_chans=in_chans)
    return DATASETS[name](name, root, train, transform, download)
