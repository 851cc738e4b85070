"""COCO-format detection data: any instances_*.json + image folder via pycocotools, large-scale jitter, instance
masks, and a tiny COCO-format demo set made from the embedded digits.

References:
  COCO      - Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014 (annotation format, pycocotools).
  LSJ       - Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for Instance Segmentation",
              CVPR 2021 (resize by a random factor in [0.1, 2.0] of the target size, then crop/pad to a square).
  ViTDet    - detectron2 projects/ViTDet (LSJ at 1024, MAE-Lite's ViT-T at 640; boxes recomputed from the cropped
              masks; empty images left out of training).
"""
import json
import logging
import os

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from util.data import atomic_folder, demo_cache_dir, read_rgb

log = logging.getLogger(__name__)


class CocoDetection(torch.utils.data.Dataset):
    """Images and instance annotations of one COCO-format split.

    Returns (image [3, H, W] float in [0, 1], target) with target = {'boxes' [K, 4] xyxy, 'labels' [K] in 1..C
    (0 is background), 'masks' [K, H, W] uint8, 'image_id'}, after `transform`; or None for an unreadable image
    (`collate` drops and counts it). Category ids are mapped to contiguous labels in sorted id order
    (`self.cat_ids[label - 1]` maps back). Crowd regions are left out of the targets (they only matter to COCOeval).
    `train=True` leaves out images without any usable annotation (they carry no loss signal).
    """

    def __init__(self, image_dir, ann_file, transform=None, train=False):
        from pycocotools.coco import COCO
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f'annotation file not found: {ann_file}')
        self.image_dir, self.ann_file, self.transform = image_dir, ann_file, transform
        self.coco = COCO(ann_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]['name'] for c in self.cat_ids]
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns[i])]
        self.ids = ids

    @staticmethod
    def _usable(ann):
        return not ann.get('iscrowd', 0) and ann['bbox'][2] >= 1 and ann['bbox'][3] >= 1

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_dir, info['file_name'])
        img = read_rgb(path)
        if img is None:
            return None
        image = tv_tensors.Image(TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True))  # [3, H, W] in [0, 1]
        H, W = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns[image_id] if self._usable(a)]
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)  # xywh
        boxes[:, 2:] += boxes[:, :2]  # -> xyxy
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, H, W), np.uint8)
        target = {'boxes': tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(H, W)),
                  'labels': torch.tensor([self.label_of[a['category_id']] for a in anns], dtype=torch.int64),
                  'masks': tv_tensors.Mask(torch.from_numpy(masks)),
                  'image_id': image_id}
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


class LargeScaleJitter:
    """Train-time augmentation: horizontal flip, resize so the image fits a (s*size)^2 square for s ~ U(min_scale,
    max_scale), random crop to at most size x size, pad bottom/right to exactly size x size with the mean colour
    (0 after normalisation, like the batch padding), boxes recomputed from the cropped masks, empty instances
    dropped."""

    def __init__(self, size, min_scale=0.1, max_scale=2.0):
        self.size = size
        self.flip_and_resize = v2.Compose([v2.RandomHorizontalFlip(),
                                           v2.ScaleJitter((size, size), scale_range=(min_scale, max_scale))])
        self.fill = list(IMAGENET_DEFAULT_MEAN)

    def __call__(self, image, target):
        image, target = self.flip_and_resize(image, target)
        H, W = image.shape[-2:]
        h, w = min(H, self.size), min(W, self.size)
        top = int(torch.randint(0, H - h + 1, ()))
        left = int(torch.randint(0, W - w + 1, ()))
        pad = [0, 0, self.size - w, self.size - h]  # left, top, right, bottom
        image = TF.pad(TF.crop(image, top, left, h, w), pad, fill=self.fill)
        masks = TF.pad(TF.crop(target['masks'], top, left, h, w), pad, fill=0)  # [K, size, size]
        keep = masks.flatten(1).bool().any(1)
        masks = masks[keep]
        boxes = masks_to_boxes(masks) if len(masks) else torch.zeros(0, 4)
        boxes[:, 2:] += 1  # masks_to_boxes gives the last pixel; a box ends one past it
        target = {**target, 'masks': masks, 'labels': target['labels'][keep],
                  'boxes': tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(self.size, self.size))}
        return image, target


class TargetList(list):
    """A batch's list of target dicts with the `.to(device)` that util.engine.train_one_epoch calls on targets."""

    def to(self, device, non_blocking=False):
        return TargetList({k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
                           for k, v in t.items()} for t in self)


def collate(batch):
    """Drop unreadable samples (None). Returns (images, TargetList, n_skipped): images stacked into one tensor
    [N, 3, S, S] when they share a size (training after LSJ), else a list (evaluation)."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    images = [b[0].as_subclass(torch.Tensor) for b in kept]  # plain tensors, not tv_tensors
    targets = TargetList({k: v.as_subclass(torch.Tensor) if torch.is_tensor(v) else v for k, v in b[1].items()}
                         for b in kept)
    if not images:
        return torch.empty(0), targets, skipped
    if all(im.shape == images[0].shape for im in images):
        images = torch.stack(images)
    return images, targets, skipped


def build_loader(dataset, batch_size, num_workers, train, seed=0, pin_mem=True):
    """DataLoader over this rank's shard (DistributedSampler at every world size, so the order depends only on
    (seed, epoch)). Training drops the last partial batch; evaluation keeps every image (the sampler pads the last
    rank's shard by repeating images; duplicates are removed before COCOeval)."""
    from util.dist import get_rank, get_world_size
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(),
                                                  shuffle=train, seed=seed, drop_last=train)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_mem and torch.cuda.is_available(), drop_last=train,
                                       collate_fn=collate)


# ---------------------------------------------------------------------------------------------------------------
# the demo set: digits pasted on canvases, written once as a COCO-format dataset

DEMO_CLASSES = (0, 1)  # digit classes used as object categories (category id = digit + 1)


def demo_coco_root():
    """The COCO-format demo set (annotations/instances_{train,val}.json, train/, val/), written on first use under
    ~/.cache/mim_lite/digits_coco (override with $MIM_DET_DEMO_DIR)."""
    root = demo_cache_dir('MIM_DET_DEMO_DIR', 'digits_coco')
    if not os.path.isfile(os.path.join(root, 'annotations', 'instances_val.json')):
        materialise_digits_coco(root)
    return root


def materialise_digits_coco(root, size=64, n_train=384, n_val=96, classes=DEMO_CLASSES, seed=0):
    """Paste 1-3 scikit-learn digits of `classes` (scaled to 12..size/2 px, random colour, not overlapping) on
    dark noisy size x size canvases. Each digit's mask is its stroke (upscaled intensity > 0.35), its box the
    mask's tight box; segmentations are stored as COCO RLE. Written to a temporary folder and renamed, so an
    interrupted write leaves nothing half-done."""
    from pycocotools import mask as mask_util
    from sklearn.datasets import load_digits
    digits = load_digits()
    pools = {c: digits.images[digits.target == c] for c in classes}
    rng = np.random.default_rng(seed)
    with atomic_folder(root) as tmp:
        os.makedirs(os.path.join(tmp, 'annotations'))
        categories = [{'id': c + 1, 'name': str(c), 'supercategory': 'digit'} for c in classes]
        ann_id = 1
        for split, n, offset in (('train', n_train, 0), ('val', n_val, 100000)):
            os.makedirs(os.path.join(tmp, split))
            images, annotations = [], []
            for i in range(n):
                canvas = rng.integers(0, 48, size=(size, size, 3)).astype(np.float32)
                taken = np.zeros((size, size), bool)
                for _ in range(int(rng.integers(1, 4))):
                    for _attempt in range(20):
                        s = int(rng.integers(12, size // 2 + 1))
                        y, x = (int(v) for v in rng.integers(0, size - s + 1, size=2))
                        if not taken[y:y + s, x:x + s].any():
                            break
                    else:
                        continue
                    taken[y:y + s, x:x + s] = True
                    c = classes[int(rng.integers(len(classes)))]
                    glyph = pools[c][int(rng.integers(len(pools[c])))]  # [8, 8] in 0..16
                    glyph = Image.fromarray((glyph * (255 / 16)).astype(np.uint8)).resize((s, s), Image.BICUBIC)
                    alpha = np.asarray(glyph, np.float32)[..., None] / 255.0  # [s, s, 1]
                    colour = rng.integers(128, 256, size=3).astype(np.float32)
                    canvas[y:y + s, x:x + s] = canvas[y:y + s, x:x + s] * (1 - alpha) + colour * alpha
                    mask = np.zeros((size, size), np.uint8)
                    mask[y:y + s, x:x + s] = alpha[..., 0] > 0.35
                    if not mask.any():
                        continue
                    rle = mask_util.encode(np.asfortranarray(mask))
                    x0, y0, w, h = (float(v) for v in mask_util.toBbox(rle))
                    annotations.append({'id': ann_id, 'image_id': offset + i, 'category_id': c + 1, 'iscrowd': 0,
                                        'bbox': [x0, y0, w, h], 'area': float(mask_util.area(rle)),
                                        'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}})
                    ann_id += 1
                name = f'{offset + i:06d}.png'
                Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(os.path.join(tmp, split, name))
                images.append({'id': offset + i, 'file_name': name, 'height': size, 'width': size})
            with open(os.path.join(tmp, 'annotations', f'instances_{split}.json'), 'w') as f:
                json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)
    log.info(f'COCO-format demo set (digits {classes} on {size} px canvases) written to {root}')
    return root
