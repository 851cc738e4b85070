"""COCO evaluation of a torchvision detection model with pycocotools: box and mask AP, AP50, AP75, APs/m/l.

References: COCO detection evaluation (pycocotools COCOeval, the metrics every detection paper reports);
torchvision's detection reference (outputs in original-image coordinates, masks as probabilities).
"""
import contextlib
import io
import json
import logging
import os

import numpy as np
import torch
import torch.distributed

from util import dist

log = logging.getLogger(__name__)
METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')  # the first six COCOeval stats, in this order


def to_coco_results(output, image_id, cat_ids, mask_threshold=0.5):
    """One image's model output -> COCO result dicts (bbox in xywh; segm as compressed RLE with str counts).

    Args: output {'boxes' [K, 4] xyxy, 'scores' [K], 'labels' [K] in 1..C, optional 'masks' [K, 1, H, W]
    probabilities}; cat_ids[label - 1] is the dataset's category id."""
    from pycocotools import mask as mask_util
    boxes = output['boxes'].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
    scores, labels = output['scores'].float().cpu().tolist(), output['labels'].cpu().tolist()
    rles = [None] * len(scores)
    if 'masks' in output and len(scores):
        masks = (output['masks'][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)  # [K, H, W]
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))  # K RLEs of [H, W]
    results = []
    for box, score, label, rle in zip(boxes.tolist(), scores, labels, rles):
        r = {'image_id': image_id, 'category_id': cat_ids[label - 1], 'bbox': box, 'score': score}
        if rle is not None:
            r['segmentation'] = {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}
        results.append(r)
    return results


@torch.no_grad()
def predict(model, loader, cat_ids, device, autocast=contextlib.nullcontext):
    """Run `model` (eval mode) over `loader`; returns {image_id: [COCO result dicts]} for this rank's images."""
    model.eval()
    per_image = {}
    for images, targets, _ in loader:
        images = [im.to(device, non_blocking=True) for im in images]
        with autocast():
            outputs = model(images)
        for t, out in zip(targets, outputs):
            per_image[int(t['image_id'])] = to_coco_results(out, int(t['image_id']), cat_ids)
    return per_image


def gather_per_image(per_image):
    """Merge every rank's {image_id: results}; images repeated by the sampler's padding count once."""
    if not dist.is_dist():
        return per_image
    parts = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(parts, per_image)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def summarize(coco_gt, results, iou_type, image_ids):
    """COCOeval for one iou type ('bbox' or 'segm'); returns ({metric: value in %}, the printed summary table)."""
    from pycocotools.cocoeval import COCOeval
    if not results:  # loadRes cannot take an empty list; no detection scores 0 everywhere
        return {m: 0.0 for m in METRICS}, 'no detections'
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # pycocotools prints; keep it for the log instead of stdout
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where there is no ground truth of that size; keep it as is (means "not applicable")
    return {m: float(v) * 100 if v >= 0 else float(v) for m, v in zip(METRICS, ev.stats[:6])}, buf.getvalue()


def coco_evaluate(model, loader, dataset, device, autocast=contextlib.nullcontext, output_dir=None, tag='val'):
    """Predict on `dataset` (a det.data.CocoDetection, sharded by `loader`) and score with COCOeval.

    Returns {'bbox_AP': .., 'bbox_AP50': .., ..., 'segm_APl': ..} in percent on every rank. Rank 0 writes the raw
    detections (`{output_dir}/coco_{tag}_results.json`) and the metrics (`{output_dir}/coco_{tag}_metrics.json`).
    """
    per_image = gather_per_image(predict(model, loader, dataset.cat_ids, device, autocast))
    metrics = None
    if dist.is_main_process():
        results = [r for image_id in sorted(per_image) for r in per_image[image_id]]
        metrics = {}
        for iou_type in ('bbox', 'segm'):
            if iou_type == 'segm' and results and 'segmentation' not in results[0]:
                continue
            # one geometry per evaluation: with both present, loadRes would take the box area for segm's APs/m/l
            drop = 'segmentation' if iou_type == 'bbox' else 'bbox'
            rows = [{k: v for k, v in r.items() if k != drop} for r in results]  # copies: loadRes edits them
            scores, table = summarize(dataset.coco, rows, iou_type, dataset.ids)
            log.info(f'COCO {iou_type} ({len(per_image)} images, {len(results)} detections):\n{table}')
            metrics.update({f'{iou_type}_{k}': v for k, v in scores.items()})
        if output_dir:
            with open(os.path.join(output_dir, f'coco_{tag}_results.json'), 'w') as f:
                json.dump(results, f)
            with open(os.path.join(output_dir, f'coco_{tag}_metrics.json'), 'w') as f:
                json.dump(metrics, f, indent=1)
    if dist.is_dist():
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics
