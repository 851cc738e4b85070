"""Tracking data: sequence readers (LaSOT, GOT-10k, TrackingNet layouts; COCO as static pairs), template/search pair
sampling with OSTrack's jitter, crops that return their transform, and the demo sequences.

References:
  OSTrack - Ye et al., "Joint Feature Learning and Relation Modeling for Tracking: A One-Stream Framework", ECCV 2022
            (template factor 2 / search factor 4 crops, centre jitter 3 and scale jitter 0.25 on the search box).
  LaSOT (Fan et al., CVPR 2019), GOT-10k (Huang et al., TPAMI 2019), TrackingNet (Müller et al., ECCV 2018): folder
            layouts. COCO (Lin et al., ECCV 2014): each object instance is a one-frame "sequence".
Boxes are [x, y, w, h] in pixels (top-left corner, continuous coordinates) everywhere except the network targets,
which are [cx, cy, w, h] normalised by the search crop size.
"""
import json
import logging
import math
import os

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.data import IMG_EXTENSIONS, atomic_folder, demo_cache_dir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# crops

def crop_transform(box, factor, out_size):
    """The square crop of side ceil(sqrt(w*h) * factor) centred on `box`, resized to `out_size`.

    Returns (x0, y0, scale): crop pixel (u, v) shows image point (x0 + u / scale, y0 + v / scale)."""
    x, y, w, h = (float(v) for v in box)
    side = math.ceil(math.sqrt(max(w * h, 1e-6)) * factor)
    side = max(side, 1)
    return x + 0.5 * w - 0.5 * side, y + 0.5 * h - 0.5 * side, out_size / side


def crop(image, box, factor, out_size):
    """Crop `image` (PIL) around `box` with context `factor` to out_size x out_size; outside the image is zero.

    Returns (crop as PIL image, transform (x0, y0, scale)) — pass the transform to `box_to_crop` / `box_from_crop`.
    Sub-pixel exact (an affine resample, not an integer crop), so boxes map in and out without rounding."""
    x0, y0, s = crop_transform(box, factor, out_size)
    # PIL's affine maps each output point (u, v) to the input point (a*u + b*v + c, d*u + e*v + f)
    out = image.transform((out_size, out_size), Image.AFFINE, (1 / s, 0, x0, 0, 1 / s, y0), resample=Image.BILINEAR)
    return out, (x0, y0, s)


def box_to_crop(box, transform):
    """Image box [x, y, w, h] -> the same box in crop pixels. Works on [4] or [..., 4] arrays/tensors."""
    x0, y0, s = transform
    b = box * 1.0
    out = b.clone() if torch.is_tensor(b) else np.array(b, dtype=np.float64)
    out[..., 0] = (b[..., 0] - x0) * s
    out[..., 1] = (b[..., 1] - y0) * s
    out[..., 2:] = b[..., 2:] * s
    return out


def box_from_crop(box, transform):
    """Crop-pixel box [x, y, w, h] -> image box; the inverse of `box_to_crop`."""
    x0, y0, s = transform
    b = box * 1.0
    out = b.clone() if torch.is_tensor(b) else np.array(b, dtype=np.float64)
    out[..., 0] = b[..., 0] / s + x0
    out[..., 1] = b[..., 1] / s + y0
    out[..., 2:] = b[..., 2:] / s
    return out


def jitter_box(box, center_jitter, scale_jitter, rng):
    """OSTrack's jitter: size × exp(N(0, scale_jitter)) per side, then the centre moves uniformly by up to
    ±0.5 · center_jitter · sqrt(jittered area) per axis. Returns the jittered [x, y, w, h]."""
    x, y, w, h = box
    size = np.array([w, h]) * np.exp(rng.standard_normal(2) * scale_jitter)
    max_offset = math.sqrt(size.prod()) * center_jitter
    cx, cy = np.array([x + 0.5 * w, y + 0.5 * h]) + max_offset * (rng.random(2) - 0.5)
    return np.array([cx - 0.5 * size[0], cy - 0.5 * size[1], size[0], size[1]])


def to_tensor(image, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """PIL RGB -> normalised [3, H, W] float tensor."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, H, W]
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# sequences

class Sequence:
    """One video: `frames` (image paths), `boxes` [T, 4] xywh, `visible` [T] bool."""

    def __init__(self, name, frames, boxes, visible=None):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(frames) < len(boxes):
            raise ValueError(f'{name}: {len(frames)} frames but {len(boxes)} boxes')
        self.name, self.frames, self.boxes = name, list(frames)[:len(boxes)], boxes
        valid = np.all(np.isfinite(boxes), axis=1) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
        self.visible = valid if visible is None else valid & np.asarray(visible, dtype=bool)[:len(boxes)]

    def __len__(self):
        return len(self.boxes)

    def __repr__(self):
        return f'Sequence({self.name!r}, {len(self)} frames)'


def read_boxes(path):
    """A ground-truth file: one [x, y, w, h] per line, separated by commas, tabs or spaces ('NaN' allowed)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append([float(v) for v in line.replace(',', ' ').replace('\t', ' ').split()[:4]])
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def read_flags(path):
    """A per-frame 0/1 file (LaSOT occlusion/out-of-view: one comma-separated line; GOT-10k absence: one per line)."""
    with open(path) as f:
        return np.array([int(float(v)) for v in f.read().replace(',', ' ').split()], dtype=bool)


def list_frames(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS))


def load_got10k(root, split=None):
    """GOT-10k layout: [root/split/]<seq>/{00000001.jpg, ..., groundtruth.txt[, absence.label]}.

    `split` ('train', 'val', 'test') is a subfolder of root; None means root holds the sequence folders. A list.txt
    in the folder, when present, gives the sequences and their order."""
    base = os.path.join(root, split) if split else root
    if not os.path.isdir(base):
        raise FileNotFoundError(f'GOT-10k-layout folder not found: {base}')
    names = sorted(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, 'groundtruth.txt')))
    if os.path.isfile(os.path.join(base, 'list.txt')):
        with open(os.path.join(base, 'list.txt')) as f:
            listed = [line.strip() for line in f if line.strip()]
        names = [n for n in listed if n in set(names)]
    seqs = []
    for name in names:
        d = os.path.join(base, name)
        boxes = read_boxes(os.path.join(d, 'groundtruth.txt'))
        absent = os.path.join(d, 'absence.label')
        visible = ~read_flags(absent) if os.path.isfile(absent) else None
        seqs.append(Sequence(name, list_frames(d), boxes, visible))
    return seqs


def load_lasot(root, names=None):
    """LaSOT layout: root/<class>/<class>-<k>/{img/00000001.jpg, groundtruth.txt, full_occlusion.txt,
    out_of_view.txt}. `names`: optional sequence names to keep (e.g. the 280 of the official testing_set.txt, or
    the training ones); None keeps all. Frames that are fully occluded or out of view are not visible."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f'LaSOT folder not found: {root}')
    keep = set(names) if names is not None else None
    seqs = []
    for cls in sorted(os.listdir(root)):
        cdir = os.path.join(root, cls)
        if not os.path.isdir(cdir):
            continue
        for name in sorted(os.listdir(cdir)):
            d = os.path.join(cdir, name)
            if (keep is not None and name not in keep) or not os.path.isfile(os.path.join(d, 'groundtruth.txt')):
                continue
            boxes = read_boxes(os.path.join(d, 'groundtruth.txt'))
            visible = np.ones(len(boxes), dtype=bool)
            for flag in ('full_occlusion.txt', 'out_of_view.txt'):
                if os.path.isfile(os.path.join(d, flag)):
                    visible &= ~read_flags(os.path.join(d, flag))[:len(boxes)]
            img = os.path.join(d, 'img')
            seqs.append(Sequence(name, list_frames(img if os.path.isdir(img) else d), boxes, visible))
    return seqs


def load_trackingnet(root, chunks=None):
    """TrackingNet layout: root/TRAIN_<k>/{frames/<video>/<i>.jpg, anno/<video>.txt}; `chunks` (e.g. [0, 1, 2])
    selects TRAIN_<k> folders (default: every TRAIN_* or TEST folder present). Frames are numbered 0, 1, ... and
    sorted numerically."""
    folders = sorted(d for d in os.listdir(root) if d.startswith(('TRAIN_', 'TEST')))
    if chunks is not None:
        folders = [f'TRAIN_{k}' for k in chunks]
    seqs = []
    for chunk in folders:
        anno = os.path.join(root, chunk, 'anno')
        for f in sorted(os.listdir(anno)):
            video = f[:-len('.txt')]
            fdir = os.path.join(root, chunk, 'frames', video)
            frames = sorted(list_frames(fdir), key=lambda p: int(os.path.splitext(os.path.basename(p))[0]))
            seqs.append(Sequence(video, frames, read_boxes(os.path.join(anno, f))))
    return seqs


def load_coco(root, split='train2017', min_area=64):
    """COCO as static pairs: every non-crowd instance (area >= min_area) of root/annotations/instances_{split}.json
    becomes a one-frame sequence of root/{split}/<file>; template and search then come from the same image with
    different jitter."""
    with open(os.path.join(root, 'annotations', f'instances_{split}.json')) as f:
        coco = json.load(f)
    files = {img['id']: img['file_name'] for img in coco['images']}
    seqs = []
    for a in coco['annotations']:
        if a.get('iscrowd', 0) or a['bbox'][2] * a['bbox'][3] < min_area:
            continue
        seqs.append(Sequence(f'coco_{a["id"]}', [os.path.join(root, split, files[a['image_id']])], [a['bbox']]))
    return seqs


LOADERS = {'got10k': load_got10k, 'lasot': load_lasot, 'trackingnet': load_trackingnet, 'coco': load_coco}


def load_sequences(kind, root, **kwargs):
    """Sequences of a dataset by layout name ('got10k', 'lasot', 'trackingnet', 'coco')."""
    if kind not in LOADERS:
        raise ValueError(f'unknown dataset layout {kind!r}; valid: {", ".join(sorted(LOADERS))}')
    return LOADERS[kind](root, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# training pairs

class PairBatch:
    """A batch of template/search crops. `util.engine.train_one_epoch` reads `.shape[0]` and calls `.to(device)` on
    its inputs; this class answers both for the pair, so the one training loop carries tracking batches too."""

    def __init__(self, template, search):
        self.template, self.search = template, search  # [N, 3, Hz, Wz], [N, 3, Hx, Wx]

    @property
    def shape(self):
        return self.search.shape

    def to(self, device, non_blocking=False):
        return PairBatch(self.template.to(device, non_blocking=non_blocking),
                         self.search.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        return PairBatch(self.template.pin_memory(), self.search.pin_memory())


def collate_pairs(batch):
    """(PairBatch, boxes [N, 4] normalised cxcywh in the search crop, n_skipped) — the triple util.engine expects;
    samples whose image could not be read (None) are dropped and counted."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return PairBatch(torch.empty(0, 3, 1, 1), torch.empty(0, 3, 1, 1)), torch.empty(0, 4), len(batch)
    z, x, box = (torch.stack(t) for t in zip(*kept))
    return PairBatch(z, x), box, len(batch) - len(kept)


class PairDataset(torch.utils.data.Dataset):
    """`samples_per_epoch` random template/search pairs drawn from weighted sequence sources (OSTrack's sampler).

    Each item: pick a source by weight, a sequence, a visible template frame and a visible search frame at most
    `max_gap` frames away; crop the template around its box (factor `template_factor`, no jitter) and the search
    region around the jittered box (factor `search_factor`, `center_jitter`, `scale_jitter`). The random draws
    depend only on (seed, epoch, index), so a resumed run and any worker count see the same pairs; call
    `set_epoch` before each epoch.
    Returns (template [3, Hz, Wz], search [3, Hx, Wx], box [4] = cx, cy, w, h / search_size), or None when an image
    cannot be read.
    """

    def __init__(self, sources, samples_per_epoch, template_size, search_size, template_factor=2.0,
                 search_factor=4.0, center_jitter=3.0, scale_jitter=0.25, max_gap=200, seed=0):
        self.sources = [(seqs, w) for seqs, w in sources if any(s.visible.any() for s in seqs)]
        if not self.sources:
            raise ValueError('no sequence with a visible target in the training sources')
        weights = np.array([w for _, w in self.sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.samples_per_epoch = samples_per_epoch
        self.template_size, self.search_size = template_size, search_size
        self.template_factor, self.search_factor = template_factor, search_factor
        self.center_jitter, self.scale_jitter = center_jitter, scale_jitter
        self.max_gap, self.seed, self.epoch = max_gap, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.samples_per_epoch

    def sample_frames(self, rng):
        for _ in range(100):
            seqs = self.sources[rng.choice(len(self.sources), p=self.weights)][0]
            seq = seqs[rng.integers(len(seqs))]
            vis = np.flatnonzero(seq.visible)
            if len(vis) == 0:
                continue
            t = vis[rng.integers(len(vis))]
            near = vis[np.abs(vis - t) <= self.max_gap]
            return seq, t, near[rng.integers(len(near))]
        raise RuntimeError('could not find a sequence with a visible target in 100 draws')

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        seq, t, s = self.sample_frames(rng)
        try:
            z_img = load_image(seq.frames[t])
            x_img = z_img if s == t else load_image(seq.frames[s])
        except (OSError, ValueError, SyntaxError) as e:
            log.warning(f'skipping unreadable frame of {seq.name}: {type(e).__name__}: {e}')
            return None
        z, _ = crop(z_img, seq.boxes[t], self.template_factor, self.template_size)
        jittered = jitter_box(seq.boxes[s], self.center_jitter, self.scale_jitter, rng)
        x, tf = crop(x_img, jittered, self.search_factor, self.search_size)
        bx, by, bw, bh = box_to_crop(seq.boxes[s], tf) / self.search_size
        box = torch.tensor([bx + 0.5 * bw, by + 0.5 * bh, bw, bh], dtype=torch.float32)
        return to_tensor(z), to_tensor(x), box


def load_image(path):
    with open(path, 'rb') as f:
        return Image.open(f).convert('RGB')


# ---------------------------------------------------------------------------------------------------------------
# demo sequences

DEMO_FRAME = 96  # demo frames are DEMO_FRAME x DEMO_FRAME RGB


def demo_tracking_root():
    """GOT-10k-layout demo sequences (train/ and val/), written on first use. Override with $MIM_TRACK_DEMO_DIR."""
    root = demo_cache_dir('MIM_TRACK_DEMO_DIR', 'track_digits')
    if not os.path.isdir(os.path.join(root, 'val')):
        materialise_demo_sequences(root)
    return root


def render_demo_sequence(digit, n_frames, rng, frame=DEMO_FRAME):
    """A digit (8x8 array, 0..16) moving and scaling over a smooth coloured texture.

    Returns (frames: list of uint8 [frame, frame, 3] arrays, boxes [n_frames, 4] xywh: the tight box of the digit's
    strokes). Motion: constant velocity of 1.5-3.5 px/frame bouncing off the borders; size 18-30 px varying as a
    sinusoid."""
    # background: random low-frequency colour field plus fine noise, kept mid-grey so the digit stays visible
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((frame, frame), Image.BICUBIC)
    bg = 60 + 0.45 * np.asarray(coarse, dtype=np.float64) + rng.normal(0, 8, (frame, frame, 3))
    colour = rng.uniform(180, 255, 3) * (rng.random(3) < 0.8) + 40  # a bright, random tint
    alpha_src = Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8), mode='L')
    base, amp, period, phase = rng.uniform(20, 26), rng.uniform(0.05, 0.2), rng.uniform(15, 40), rng.uniform(0, 6.3)
    speed, angle = rng.uniform(1.5, 3.5), rng.uniform(0, 2 * np.pi)
    vel = speed * np.array([np.cos(angle), np.sin(angle)])
    pos = rng.uniform(10, frame - 40, 2)  # top-left of the digit square
    frames, boxes = [], []
    for t in range(n_frames):
        size = int(round(base * np.exp(amp * np.sin(2 * np.pi * t / period + phase))))
        alpha = np.asarray(alpha_src.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0  # [s, s]
        for k in range(2):  # bounce off the borders
            if not 0 <= pos[k] + vel[k] <= frame - size:
                vel[k] = -vel[k]
            pos[k] = np.clip(pos[k] + vel[k], 0, frame - size)
        x, y = int(round(pos[0])), int(round(pos[1]))
        img = bg.copy()
        region = img[y:y + size, x:x + size]
        img[y:y + size, x:x + size] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        rows, cols = np.flatnonzero((alpha > 0.25).any(1)), np.flatnonzero((alpha > 0.25).any(0))
        boxes.append([x + cols[0], y + rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1])
    return frames, np.array(boxes, dtype=np.float64)


def materialise_demo_sequences(root, n_train=48, n_val=12, train_frames=30, val_frames=40, seed=0):
    """Write the demo set in GOT-10k layout: root/{train,val}/GOT-10k_{Train,Val}_%06d/{%08d.png, groundtruth.txt}
    plus list.txt. Train sequences use the sklearn digits with index % 5 != 0, val the others, so the val digits are
    unseen images. Written to a temporary folder and renamed (an interrupted write leaves nothing half-done)."""
    from sklearn.datasets import load_digits
    digits = load_digits().images
    train_ids = [i for i in range(len(digits)) if i % 5]
    val_ids = [i for i in range(len(digits)) if i % 5 == 0]
    rng = np.random.default_rng(seed)
    with atomic_folder(root) as tmp:
        for split, n, n_frames, ids in (('train', n_train, train_frames, train_ids), ('val', n_val, val_frames, val_ids)):
            names = []
            for k in range(n):
                name = f'GOT-10k_{split.capitalize()}_{k + 1:06d}'
                d = os.path.join(tmp, split, name)
                os.makedirs(d)
                frames, boxes = render_demo_sequence(digits[ids[rng.integers(len(ids))]], n_frames, rng)
                for t, f in enumerate(frames):
                    # fastest zlib level: the noisy frames hardly compress anyway, and encoding dominates the write
                    Image.fromarray(f).save(os.path.join(d, f'{t + 1:08d}.png'), compress_level=1)
                np.savetxt(os.path.join(d, 'groundtruth.txt'), boxes, fmt='%.1f', delimiter=',')
                names.append(name)
            with open(os.path.join(tmp, split, 'list.txt'), 'w') as f:
                f.write('\n'.join(names) + '\n')
    log.info(f'demo tracking sequences (moving sklearn digits) written to {root}')
