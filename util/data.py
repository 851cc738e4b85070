"""Datasets, transforms and loaders: a corruption-tolerant ImageFolder and the embedded demo data.

References: MAE (pre-training transforms), MAE-Lite (random-interpolation crops), torchvision ImageFolder.
The demo data are scikit-learn's 1,797 handwritten digits (UCI, 8x8 grey), upscaled and written once as an
ImageFolder, so every recipe runs on a fresh machine with no download.
"""
import contextlib
import logging
import os
import shutil
import tempfile

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, RandomResizedCropAndInterpolation
from torchvision import datasets, transforms

from util.dist import get_rank, get_world_size

log = logging.getLogger(__name__)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
DEMO_SIZE = 32  # digits are upscaled from 8x8 to this


def pretrain_transform(input_size, min_scale=0.08, interpolation='random', mean=IMAGENET_DEFAULT_MEAN,
                       std=IMAGENET_DEFAULT_STD):
    """RandomResizedCrop(scale=(min_scale, 1)) + horizontal flip + normalise. MAE-Lite: (0.08, 'random');
    official MAE: (0.2, 'bicubic')."""
    return transforms.Compose([
        RandomResizedCropAndInterpolation(input_size, scale=(min_scale, 1.0), interpolation=interpolation),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std)])


def eval_transform(input_size, crop_pct=224 / 256, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Resize the shorter side to input_size / crop_pct (bicubic), centre-crop input_size, normalise."""
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std)])


def read_rgb(path):
    """The image at `path` as an RGB PIL image, or None (with a warning naming the file) when it cannot be read:
    truncated or corrupt files, missing files, PIL decode errors."""
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except (OSError, ValueError, SyntaxError) as e:
        log.warning(f'skipping unreadable image {path}: {type(e).__name__}: {e}')
        return None


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that never crashes on a bad file.

    Files without an image extension are left out when indexing (`self.non_images` lists them); an image that
    cannot be decoded is returned as None, which `collate_skip` drops and counts, with a warning naming the file.
    """

    def __init__(self, root, transform=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f'data folder not found: {root}')
        non_images = []

        def is_image(path):
            ok = path.lower().endswith(IMG_EXTENSIONS)
            if not ok:
                non_images.append(path)
            return ok

        super().__init__(root, transform=transform, is_valid_file=is_image)
        self.non_images = non_images
        if non_images:
            log.warning(f'{root}: skipped {len(non_images)} non-image files, e.g. {non_images[0]}')

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = read_rgb(path)
        if img is None:
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def collate_skip(batch):
    """Default collation after dropping unreadable samples (None). Returns (images, targets, n_skipped)."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = torch.utils.data.default_collate(kept)
    return images, targets, skipped


def build_loader(dataset, batch_size, num_workers=4, pin_mem=True, train=True, seed=0, collate_fn=collate_skip):
    """DataLoader over this rank's shard (a DistributedSampler is used at every world size, so the shuffle order
    depends only on (seed, epoch) and a resumed run sees the same batches). Training drops the last partial batch.
    Call `loader.sampler.set_epoch(epoch)` each epoch."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(),
                                                  shuffle=train, seed=seed, drop_last=train)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_mem and torch.cuda.is_available(), drop_last=train,
                                       collate_fn=collate_fn, persistent_workers=False)


def demo_cache_dir(env_var, name):
    """Where a demo set lives: $`env_var` if set, else ~/.cache/mim_lite/`name` (honouring $XDG_CACHE_HOME)."""
    return os.environ.get(env_var) or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'mim_lite', name)


@contextlib.contextmanager
def atomic_folder(root):
    """Write a folder all at once: yields a temporary folder beside `root` and renames it to `root` when the block
    ends, so an interrupted write leaves nothing half-done (the temporary folder is removed on an error). When the
    rename fails (another process finished first, or `root` is a non-empty folder) the temporary folder is dropped."""
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def demo_root():
    """The demo ImageFolder (train/ and val/, classes 0-9), written on first use. Override with $MIM_DEMO_DIR."""
    root = demo_cache_dir('MIM_DEMO_DIR', 'digits')
    if not os.path.isdir(os.path.join(root, 'val')):
        materialise_digits(root)
    return root


def materialise_digits(root):
    """Write scikit-learn's 1,797 digits as DEMO_SIZE px RGB PNGs: every 5th image to val/ (360), the rest to train/
    (1,437). Written to a temporary folder and renamed, so an interrupted write leaves nothing half-done."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    with atomic_folder(root) as tmp:
        for i, (img, label) in enumerate(zip(digits.images, digits.target)):
            split = 'val' if i % 5 == 0 else 'train'
            d = os.path.join(tmp, split, str(label))
            os.makedirs(d, exist_ok=True)
            pil = Image.fromarray((img * (255.0 / 16.0)).astype('uint8'), mode='L')  # 0..16 -> 0..255
            pil.resize((DEMO_SIZE, DEMO_SIZE), Image.BICUBIC).convert('RGB').save(os.path.join(d, f'{i:04d}.png'))
    if not os.path.isdir(os.path.join(root, 'val')):  # the rename failed: `root` holds something else
        raise FileExistsError(f'cannot write the demo data to {root}: the folder exists and is not the demo data '
                              f'(no val/ inside); point $MIM_DEMO_DIR at a new or empty folder')
    log.info(f'demo data (scikit-learn digits) written to {root}')


def dataset_root(data_path, split):
    """`data_path/split` for an ImageNet-style folder, or the demo data's split when data_path is empty."""
    return os.path.join(data_path or demo_root(), split)


def num_classes(train_set, val_set, nb_classes=None):
    """The class count of a train/val ImageFolder pair, checking both splits have the same class folders (the label
    indices come from the sorted folder names, so a folder missing from one split would shift every label after it).
    `nb_classes` may ask for more outputs than there are folders (e.g. a subset of ImageNet), never fewer."""
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise ValueError(f'train/ and val/ have different class folders (only in train: {only_train[:5]}, '
                         f'only in val: {only_val[:5]}): labels would not match')
    n = len(train_set.classes)
    if nb_classes is not None and nb_classes < n:
        raise ValueError(f'--nb_classes {nb_classes} is fewer than the {n} class folders of the data')
    return nb_classes or n
