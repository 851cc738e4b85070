"""A tiny ADE20K-layout segmentation set made from the embedded demo digits, so seg/ trains and evaluates end to
end on a fresh machine with nothing to download.

Each image is a 96×96 RGB canvas (smooth random colour background) with 3 digits of scikit-learn's 1,797 (8×8,
upscaled to 16-32 px, random colour) pasted at non-overlapping places. Label map: digit class + 1 over the digit's
strokes, 0 elsewhere — ADE20K's convention, where 0 is "other" and `reduce_zero_label=True` turns it into the
ignore index 255 and classes 1..150 into 0..149 (here 1..10 into 0..9). Digits of the scikit-learn split used by
util/data.py's demo (every 5th image) go to validation only.

Layout (as ADEChallengeData2016): images/{training,validation}/*.jpg, annotations/{training,validation}/*.png.
References: ADE20K (Zhou et al., CVPR 2017) folder layout; UCI handwritten digits via scikit-learn.
"""
import logging
import os
import shutil

import numpy as np
from PIL import Image

from util.data import atomic_folder, demo_cache_dir

log = logging.getLogger(__name__)
CLASSES = tuple(str(d) for d in range(10))
PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
           [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]]
CANVAS = 96
DIGITS_PER_IMAGE = 3
NUM_IMAGES = {'training': 400, 'validation': 80}


def demo_root():
    """The demo set (written on first use): $MIM_SEG_DEMO_DIR, else ~/.cache/mim_lite/ade_digits."""
    root = demo_cache_dir('MIM_SEG_DEMO_DIR', 'ade_digits')
    if not os.path.isdir(os.path.join(root, 'annotations', 'validation')):
        materialise(root)
    return root


def _place(rng, sizes):
    """Top-left corners for squares of `sizes` inside the canvas without overlap (rejection sampling)."""
    boxes = []
    for s in sizes:
        for _ in range(100):
            y, x = rng.integers(0, CANVAS - s + 1, size=2)
            if all(y + s <= by or by + bs <= y or x + s <= bx or bx + bs <= x for by, bx, bs in boxes):
                break
        boxes.append((int(y), int(x), int(s)))
    return boxes


def make_image(rng, digit_images, digit_labels):
    """One canvas. Args: digit_images [k, 8, 8] in 0..16, digit_labels [k]. Returns (RGB uint8 [96, 96, 3],
    label uint8 [96, 96] with 0 = background, c + 1 = digit c)."""
    low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)  # smooth background: upsampled 4×4 colour noise
    img = np.asarray(Image.fromarray(low).resize((CANVAS, CANVAS), Image.BICUBIC), dtype=np.float32)
    img = np.clip(img * 0.6 + rng.normal(0, 8, size=img.shape), 0, 255)  # [96, 96, 3], dimmed, with grain
    label = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    sizes = rng.integers(16, 33, size=len(digit_labels))
    for (y, x, s), digit, c in zip(_place(rng, sizes), digit_images, digit_labels):
        glyph = Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8), mode='L')
        alpha = np.asarray(glyph.resize((s, s), Image.BICUBIC), dtype=np.float32) / 255.0  # [s, s] in 0..1
        colour = rng.uniform(128, 255, size=3)
        patch = img[y:y + s, x:x + s]  # [s, s, 3] view
        patch[:] = patch * (1 - alpha[..., None]) + colour * alpha[..., None]
        label[y:y + s, x:x + s][alpha > 0.5] = c + 1
    return img.astype(np.uint8), label


def materialise(root, num_images=None, seed=0):
    """Write the demo set to `root` (via a temporary folder renamed at the end, so an interrupted write leaves
    nothing half-done). `num_images`: {'training': n, 'validation': m} to override the sizes (tests)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    num_images = num_images or NUM_IMAGES
    rng = np.random.default_rng(seed)
    with atomic_folder(root) as tmp:
        index = np.arange(len(digits.target))
        pools = {'training': index[index % 5 != 0], 'validation': index[index % 5 == 0]}  # as util/data.py's split
        for split, n in num_images.items():
            os.makedirs(os.path.join(tmp, 'images', split))
            os.makedirs(os.path.join(tmp, 'annotations', split))
            for i in range(n):
                pick = rng.choice(pools[split], size=DIGITS_PER_IMAGE, replace=False)
                img, label = make_image(rng, digits.images[pick], digits.target[pick])
                name = f'demo_{split}_{i:05d}'
                Image.fromarray(img).save(os.path.join(tmp, 'images', split, name + '.jpg'), quality=95)
                Image.fromarray(label).save(os.path.join(tmp, 'annotations', split, name + '.png'))
        if os.path.isdir(root):  # e.g. an older, partial folder: replace it
            shutil.rmtree(root)
    log.info(f'demo segmentation set (digits on random backgrounds) written to {root}')
    return root
