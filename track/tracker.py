"""Inference: follow one target through a sequence with a trained OSTrack, frame by frame.

References:
  OSTrack - Ye et al., ECCV 2022 (search region cropped around the last box, Hanning window on the score map,
            no template update).
  SiamFC  - Bertinetto et al., ECCVW 2016 (the cosine/Hanning window penalising large displacements).
"""
import time

import numpy as np
import torch

from track.data import box_from_crop, crop, load_image, to_tensor
from track.model import decode_boxes


class Tracker:
    """OSTrack inference: `initialize(image, box)` on the first frame, then `track(image)` -> box per frame.
    Boxes are [x, y, w, h] image pixels; images are PIL RGB."""

    def __init__(self, model, device='cpu', template_factor=2.0, search_factor=4.0, window=True, keep_ratio=None):
        self.model = model.eval().to(device)
        self.device = device
        self.template_factor, self.search_factor = template_factor, search_factor
        self.keep_ratio = keep_ratio  # None = the model's own ce_keep_ratio
        h, w = model.grid_x
        # outer product of 1-D Hann windows over the score-map grid: favours small displacements from the last box.
        # OSTrack's (pytracking's) window, 0.5 (1 - cos(2 pi k / (n + 1))) for k = 1..n, is the interior of an n + 2
        # point window: positive on the border cells, so a target there can still be found
        hann = torch.outer(*(torch.hann_window(n + 2, periodic=False)[1:-1] for n in (h, w)))
        self.window = hann.to(device).view(1, 1, h, w) if window else None
        self.template = self.box = None

    @torch.no_grad()
    def initialize(self, image, box):
        z, _ = crop(image, box, self.template_factor, self.model.template_size)
        self.template = to_tensor(z).unsqueeze(0).to(self.device)  # [1, 3, Hz, Wz]
        self.box = np.asarray(box, dtype=np.float64)

    @torch.no_grad()
    def track(self, image):
        S = self.model.search_size
        x, tf = crop(image, self.box, self.search_factor, S)
        out = self.model(self.template, to_tensor(x).unsqueeze(0).to(self.device), keep_ratio=self.keep_ratio)
        score = out['score_map'] if self.window is None else out['score_map'] * self.window
        cx, cy, w, h = (decode_boxes(score, out['offset_map'], out['size_map'])[0].float().cpu().numpy() * S)
        box = box_from_crop(np.array([cx - 0.5 * w, cy - 0.5 * h, w, h]), tf)
        self.box = clip_box(box, image.width, image.height)
        return self.box.copy()


def clip_box(box, width, height, margin=10.0):
    """OSTrack's clip: the box's corners are clipped to the image, keeping at least `margin` px of it inside and
    sides of at least `margin` px (so a run-away size estimate cannot grow past the image)."""
    x1, y1, w, h = (float(v) for v in box)
    x2, y2 = x1 + w, y1 + h
    x1, y1 = min(max(0.0, x1), width - margin), min(max(0.0, y1), height - margin)
    x2, y2 = min(max(margin, x2), float(width)), min(max(margin, y2), float(height))
    return np.array([x1, y1, max(margin, x2 - x1), max(margin, y2 - y1)])


def run_sequence(tracker, seq):
    """Track `seq` (track.data.Sequence) from its first ground-truth box.
    Returns (boxes [T, 4] with frame 0 = the given box, seconds spent in tracker.track over frames 1..T-1)."""
    boxes = [np.asarray(seq.boxes[0], dtype=np.float64)]
    tracker.initialize(load_image(seq.frames[0]), seq.boxes[0])
    seconds = 0.0
    for path in seq.frames[1:len(seq)]:
        image = load_image(path)  # decoding is not counted in the tracker's speed
        start = time.perf_counter()
        boxes.append(tracker.track(image))
        seconds += time.perf_counter() - start
    return np.stack(boxes), seconds


def stay_still(seq):
    """The baseline that never moves: the first box on every frame."""
    return np.repeat(np.asarray(seq.boxes[:1], dtype=np.float64), len(seq), axis=0)


def run_dataset(tracker, sequences, out_dir=None):
    """Track every sequence; optionally write out_dir/<name>.txt (one 'x,y,w,h' line per frame, pytracking's
    format). Returns ({name: boxes [T, 4]}, frames per second over all tracked frames)."""
    import os
    preds, seconds, frames = {}, 0.0, 0
    for seq in sequences:
        boxes, s = run_sequence(tracker, seq)
        preds[seq.name], seconds, frames = boxes, seconds + s, frames + len(seq) - 1
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            np.savetxt(os.path.join(out_dir, f'{seq.name}.txt'), boxes, fmt='%.2f', delimiter=',')
    return preds, frames / max(seconds, 1e-9)
