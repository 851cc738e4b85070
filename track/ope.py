"""One-pass evaluation (OPE) of single-object trackers: success AUC, precision at 20 px, normalised precision at 0.2,
per sequence and overall, with success/precision plots.

References:
  OTB  - Wu et al., "Online Object Tracking: A Benchmark", CVPR 2013 (OPE, success and precision plots).
  LaSOT - Fan et al., CVPR 2019 (normalised precision).
  pytracking / OSTrack evaluation convention, followed here: IoU thresholds 0:0.01:1 (101 points) and a frame
  succeeds when IoU > threshold (strict); centre-error thresholds 0..50 px and 0..0.5 with error <= threshold; the
  first frame's prediction is replaced by the ground truth; frames without a valid ground-truth box (w or h <= 0,
  NaN, or flagged invisible) fail every threshold and, by default, still count in the denominator; a sequence's
  curves are fractions of its frames and the overall curves the mean over sequences; AUC = mean of the success
  curve over the 101 thresholds, x100.
  Consequence of the strict test: a perfect tracker scores 100 on precision and on the success curve everywhere but
  at threshold 1.0, i.e. AUC 100 * 100/101 = 99.01. `strict=False` (IoU >= threshold) gives it exactly 100.
"""
import numpy as np

IOU_THRESHOLDS = np.arange(101) / 100.0  # exactly i/100, so a hand-computed IoU of 0.6 compares as expected
PIXEL_THRESHOLDS = np.arange(51, dtype=np.float64)  # 0..50 px; precision is read at 20
NORM_THRESHOLDS = np.arange(51) / 100.0  # 0..0.5; normalised precision is read at 0.2


def iou_xywh(a, b):
    """IoU of matching [x, y, w, h] boxes, arrays [T, 4] -> [T]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    tl = np.maximum(a[:, :2], b[:, :2])
    br = np.minimum(a[:, :2] + a[:, 2:], b[:, :2] + b[:, 2:])
    inter = np.clip(br - tl, 0, None).prod(axis=1)
    union = a[:, 2:].prod(axis=1) + b[:, 2:].prod(axis=1) - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    # (x + w) - x can miss w by an ulp, so identical boxes may score 1 ± 1e-16; rounding makes ties with the
    # thresholds (identical boxes, whole-pixel shifts) compare as in exact arithmetic
    return np.clip(np.round(iou, 10), 0.0, 1.0)


def centre_error(pred, gt, normalised=False):
    """Distance between box centres [T]; `normalised` divides each axis by the ground-truth w, h first (LaSOT)."""
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    d = (pred[:, :2] + 0.5 * pred[:, 2:]) - (gt[:, :2] + 0.5 * gt[:, 2:])  # [T, 2]
    if normalised:
        d = d / np.where(gt[:, 2:] > 0, gt[:, 2:], 1.0)
    return np.sqrt((d ** 2).sum(axis=1))


def sequence_curves(pred, gt, visible=None, exclude_invalid=False, strict=True):
    """Success / precision / normalised-precision curves of one sequence.

    Args: pred, gt [T, 4] xywh (pred may be shorter: missing frames count as failures); visible [T] bool or None.
    Returns dict: success [101] (over IOU_THRESHOLDS), precision [51] (PIXEL_THRESHOLDS), norm_precision [51]
    (NORM_THRESHOLDS), mean_iou (over valid frames), n_frames (the denominator).
    """
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    T = len(gt)
    p = np.zeros((T, 4))
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)[:T]
    p[:len(pred)] = pred
    p[0] = gt[0]  # the tracker is given frame 0
    valid = np.all(np.isfinite(gt), axis=1) & (np.nan_to_num(gt[:, 2]) > 0) & (np.nan_to_num(gt[:, 3]) > 0)
    if visible is not None:
        valid &= np.asarray(visible, dtype=bool)[:T]
    g = np.where(valid[:, None], gt, 1.0)  # placeholder boxes for invalid frames; their errors are overwritten
    iou = np.where(valid, iou_xywh(p, g), -1.0)
    err = np.where(valid, centre_error(p, g), np.inf)
    nerr = np.where(valid, centre_error(p, g, normalised=True), np.inf)
    n = int(valid.sum()) if exclude_invalid else T
    n = max(n, 1)
    above = iou[:, None] > IOU_THRESHOLDS[None] if strict else iou[:, None] >= IOU_THRESHOLDS[None]  # [T, 101]
    return dict(success=above.sum(0) / n,
                precision=(err[:, None] <= PIXEL_THRESHOLDS[None]).sum(0) / n,
                norm_precision=(nerr[:, None] <= NORM_THRESHOLDS[None]).sum(0) / n,
                mean_iou=float(iou[valid].mean()) if valid.any() else 0.0, n_frames=n)


def summarise(curves):
    """Scalar metrics (in %) from a curves dict: auc, precision (20 px), norm_precision (0.2), op50, op75."""
    return dict(auc=100.0 * float(np.mean(curves['success'])),
                precision=100.0 * float(curves['precision'][20]),
                norm_precision=100.0 * float(curves['norm_precision'][20]),
                op50=100.0 * float(curves['success'][50]), op75=100.0 * float(curves['success'][75]))


def evaluate(predictions, sequences, exclude_invalid=False, strict=True):
    """OPE over a dataset.

    Args: predictions {sequence name: [T, 4] xywh}; sequences: objects with .name, .boxes [T, 4], .visible [T]
    (track.data.Sequence); a sequence without predictions raises.
    Returns dict: per_sequence {name: summarise(...) + mean_iou}, overall summarise(...) of the mean curves,
    curves (the mean success / precision / norm_precision curves, as lists), n_sequences.
    """
    per_seq, all_curves = {}, []
    for seq in sequences:
        if seq.name not in predictions:
            raise KeyError(f'no predictions for sequence {seq.name}')
        c = sequence_curves(predictions[seq.name], seq.boxes, seq.visible, exclude_invalid, strict)
        per_seq[seq.name] = {**summarise(c), 'mean_iou': c['mean_iou']}
        all_curves.append(c)
    mean = {k: np.mean([c[k] for c in all_curves], axis=0) for k in ('success', 'precision', 'norm_precision')}
    return dict(per_sequence=per_seq, overall=summarise(mean), n_sequences=len(all_curves),
                curves={k: v.tolist() for k, v in mean.items()})


def plot_curves(results, path_prefix):
    """Success and precision plots as PNGs: {path_prefix}success.png, {path_prefix}precision.png.

    Args: results {tracker name: evaluate(...) output}. Returns the two paths."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    paths = []
    for kind, xs, key, xlabel, metric in (
            ('success', IOU_THRESHOLDS, 'success', 'overlap threshold', 'auc'),
            ('precision', PIXEL_THRESHOLDS, 'precision', 'location error threshold (px)', 'precision')):
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, r in sorted(results.items(), key=lambda kv: -kv[1]['overall'][metric]):
            label = f'{name} [{r["overall"][metric]:.1f}]'
            ax.plot(xs, np.array(r['curves'][key]) * 100.0, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f'{kind} rate (%)')
        ax.set_title(f'{kind} plots of OPE' + (' (AUC)' if kind == 'success' else ' (at 20 px)'))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc='lower left' if kind == 'success' else 'lower right')
        fig.tight_layout()
        path = f'{path_prefix}{kind}.png'
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
