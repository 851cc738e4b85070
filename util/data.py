"""Datasets, transforms and loaders: a corruption-tolerant ImageFolder (RGB, greyscale or .npy arrays of any channel
count, `--in_chans`) and the embedded demo data.

References: MAE (pre-training transforms), MAE-Lite (random-interpolation crops), torchvision ImageFolder.
The demo data are scikit-learn's 1,797 handwritten digits (UCI, 8x8 grey), upscaled and written once as an
ImageFolder, so every recipe runs on a fresh machine with no download.
"""
import contextlib
import logging
import os
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, RandomResizedCropAndInterpolation
from torchvision import datasets, transforms

from util.dist import get_rank, get_world_size

log = logging.getLogger(__name__)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
NPY_EXTENSIONS = ('.npy',)  # what the class folders hold for --in_chans other than 1 and 3
DEMO_SIZE = 32  # digits are upscaled from 8x8 to this
# Greyscale (--in_chans 1) default: the average of ImageNet's three channel statistics
GREY_MEAN, GREY_STD = (0.449,), (0.226,)


def is_array_input(in_chans):
    """Whether `in_chans` inputs are read from .npy arrays (tensors) rather than image files (PIL)."""
    return in_chans not in (1, 3)


def channel_stats(in_chans=3, mean=None, std=None):
    """The per-channel normalisation of `in_chans` inputs: `mean`/`std` (--mean/--std) when given, else ImageNet's
    for 3 channels and GREY_MEAN/GREY_STD for 1. Any other channel count has no default.

    Returns: (mean, std), tuples of in_chans floats. Raises ValueError naming the flags when they are missing, of the
    wrong length, or given one without the other."""
    if in_chans < 1:
        raise ValueError(f'--in_chans must be at least 1, got {in_chans}')
    if (mean is None) != (std is None):
        raise ValueError('--mean and --std go together: pass both (one value per input channel) or neither')
    if mean is None:
        defaults = {3: (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), 1: (GREY_MEAN, GREY_STD)}
        if in_chans not in defaults:
            raise ValueError(f'--in_chans {in_chans} has no default normalisation: pass the per-channel statistics '
                             f'of your data with --mean and --std, {in_chans} values each')
        return tuple(defaults[in_chans][0]), tuple(defaults[in_chans][1])
    for flag, values in (('--mean', mean), ('--std', std)):
        if len(values) != in_chans:
            raise ValueError(f'{flag} has {len(values)} values; --in_chans {in_chans} needs one per channel')
    if any(s <= 0 for s in std):
        raise ValueError(f'--std must be positive, got {list(std)}')
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def to_tensor_steps(in_chans):
    """[ToTensor()] for image files (PIL), [] for .npy inputs, which are tensors already."""
    return [] if is_array_input(in_chans) else [transforms.ToTensor()]


def pretrain_transform(input_size, min_scale=0.08, interpolation='random', mean=IMAGENET_DEFAULT_MEAN,
                       std=IMAGENET_DEFAULT_STD, in_chans=3):
    """RandomResizedCrop(scale=(min_scale, 1)) + horizontal flip + normalise. MAE-Lite: (0.08, 'random');
    official MAE: (0.2, 'bicubic'). The same steps run on the [C, H, W] tensors of .npy inputs (`in_chans` not 1
    or 3)."""
    return transforms.Compose([
        RandomResizedCropAndInterpolation(input_size, scale=(min_scale, 1.0), interpolation=interpolation),
        transforms.RandomHorizontalFlip(),
        *to_tensor_steps(in_chans),
        transforms.Normalize(mean, std)])


def eval_transform(input_size, crop_pct=224 / 256, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                   in_chans=3):
    """Resize the shorter side to input_size / crop_pct (bicubic), centre-crop input_size, normalise (on PIL
    images, or on the [C, H, W] tensors of .npy inputs)."""
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        *to_tensor_steps(in_chans),
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


def read_image(path, in_chans=3):
    """The input at `path` for `in_chans` channels, or None (with a warning naming the file) when it cannot be read
    or has another channel count.

    Returns: an RGB PIL image (in_chans 3, `read_rgb`), a greyscale 'L' PIL image (1), else a float tensor
    [C, H, W] from an .npy array [H, W, C]: uint8 scaled to [0, 1] as ToTensor does, floats as stored."""
    if in_chans == 3:
        return read_rgb(path)
    try:
        if in_chans == 1:
            with open(path, 'rb') as f:
                return Image.open(f).convert('L')
        arr = np.load(path, allow_pickle=False)  # [H, W, C]
    except (OSError, ValueError, SyntaxError) as e:
        log.warning(f'skipping unreadable file {path}: {type(e).__name__}: {e}')
        return None
    if arr.ndim != 3 or arr.shape[2] != in_chans or not (arr.dtype == np.uint8 or arr.dtype.kind == 'f'):
        log.warning(f'skipping {path}: array {arr.dtype} {list(arr.shape)}, expected [H, W, {in_chans}] uint8 or '
                    f'float (--in_chans {in_chans})')
        return None
    img = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # [C, H, W]
    return img.float().div_(255) if arr.dtype == np.uint8 else img.float()


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that never crashes on a bad file.

    Files without an image extension are left out when indexing (`self.non_images` lists them); an image that
    cannot be decoded is returned as None, which `collate_skip` drops and counts, with a warning naming the file.
    `in_chans` 1 reads the images as greyscale; any count but 1 and 3 indexes .npy files instead of images, and an
    array of another channel count counts as unreadable (`read_image`).
    """

    def __init__(self, root, transform=None, in_chans=3):
        if not os.path.isdir(root):
            raise FileNotFoundError(f'data folder not found: {root}')
        non_images = []
        self.in_chans = in_chans
        extensions = NPY_EXTENSIONS if is_array_input(in_chans) else IMG_EXTENSIONS

        def is_image(path):
            ok = path.lower().endswith(extensions)
            if not ok:
                non_images.append(path)
            return ok

        super().__init__(root, transform=transform, is_valid_file=is_image)
        self.non_images = non_images
        if non_images:
            log.warning(f'{root}: skipped {len(non_images)} non-image files, e.g. {non_images[0]}')

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = read_image(path, self.in_chans)
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
