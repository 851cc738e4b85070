"""Track every sequence of a LaSOT / GOT-10k / TrackingNet-layout folder with a trained tracker, write per-frame
boxes and score them with one-pass evaluation (OPE).

  # the demo val split with the demo tracker of `python track/train.py --output_dir output_dir/track_demo`
  python track/test.py --checkpoint output_dir/track_demo/checkpoint-last.pth --output_dir output_dir/track_demo/val
  # LaSOT test set (the 280 sequences of testing_set.txt)
  python track/test.py --checkpoint out/ostrack_vit_tiny/checkpoint-last.pth --dataset lasot --data /data/lasot \
      --names /data/lasot/testing_set.txt --output_dir out/ostrack_vit_tiny/lasot
  # the stay-still baseline (first box on every frame), for reference
  python track/test.py --tracker stay_still --output_dir output_dir/track_demo/stay_still

Writes output_dir/boxes/<sequence>.txt ('x,y,w,h' per frame), results.json (per-sequence and overall AUC,
precision at 20 px, normalised precision at 0.2, fps) and success.png / precision.png.
GOT-10k's test split has no public ground truth: run with --no_eval and submit the boxes to its server.

References: OSTrack (Ye et al., ECCV 2022) inference; OPE as in track/ope.py.
"""
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: models_vit, util, track

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from track import data as tdata  # noqa: E402
from track.model import build_tracker  # noqa: E402
from track.ope import evaluate, plot_curves  # noqa: E402
from track.tracker import Tracker, run_dataset, stay_still  # noqa: E402
from util.checkpoint import load_file  # noqa: E402
from util.dist import resolve_device  # noqa: E402
from util.logger import setup_logging  # noqa: E402

log = logging.getLogger('mim')


def get_args_parser():
    p = argparse.ArgumentParser('Track sequences and evaluate (OPE)')
    p.add_argument('--checkpoint', default='', help='a checkpoint written by track/train.py (its args give the model)')
    p.add_argument('--tracker', default='ostrack', choices=['ostrack', 'stay_still'],
                   help="'stay_still' repeats the first box: the floor any tracker must beat")
    p.add_argument('--dataset', default='got10k', choices=sorted(tdata.LOADERS), help='folder layout')
    p.add_argument('--data', default='', help='dataset root (GOT-10k: the split folder, e.g. /data/got10k/val); '
                                              'empty = the demo val split')
    p.add_argument('--names', default='', help='optional file listing the sequence names to run (e.g. LaSOT\'s '
                                               'testing_set.txt)')
    p.add_argument('--output_dir', default='./output_dir/track_test')
    p.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'cuda:N'")
    p.add_argument('--no_window', action='store_true', help='do not apply the Hanning window to the score map')
    p.add_argument('--keep_ratio', type=float, default=None,
                   help='candidate-elimination keep ratio at test time (default: the trained --ce_keep_ratio)')
    p.add_argument('--no_eval', action='store_true', help='only write boxes (ground truth not available)')
    return p


def load_tracker(path, device):
    """Rebuild the tracker a train.py checkpoint was trained as, with its weights."""
    ckpt = load_file(path)
    a = ckpt['args']
    vit_kwargs = {k: a[k] for k in ('num_heads', 'patch_size') if a.get(k) is not None}
    model = build_tracker(a['model'], '', a['template_size'], a['search_size'], a['ce_layers'], a['ce_keep_ratio'],
                          a['head_channels'], **vit_kwargs)
    model.load_state_dict(ckpt['model'], strict=True)
    return model.to(device), a


def main(args):
    setup_logging(0)
    device = resolve_device(args.device, 0)
    if args.data:
        kwargs = {}
        if args.names:
            with open(args.names) as f:
                names = [line.strip() for line in f if line.strip()]
            if args.dataset == 'lasot':
                kwargs['names'] = names
        seqs = tdata.load_sequences(args.dataset, args.data, **kwargs)
        if args.names and args.dataset != 'lasot':
            seqs = [s for s in seqs if s.name in set(names)]
    else:
        seqs = tdata.load_got10k(tdata.demo_tracking_root(), 'val')
    log.info(f'{len(seqs)} sequences, {sum(len(s) for s in seqs)} frames')
    box_dir = os.path.join(args.output_dir, 'boxes')
    if args.tracker == 'stay_still':
        preds, fps = {s.name: stay_still(s) for s in seqs}, float('nan')
        os.makedirs(box_dir, exist_ok=True)
        for name, boxes in preds.items():
            np.savetxt(os.path.join(box_dir, f'{name}.txt'), boxes, fmt='%.2f', delimiter=',')
        name = 'stay-still'
    else:
        if not args.checkpoint:
            raise ValueError('--checkpoint is required for --tracker ostrack')
        model, targs = load_tracker(args.checkpoint, device)
        tracker = Tracker(model, device, targs['template_factor'], targs['search_factor'], window=not args.no_window,
                          keep_ratio=args.keep_ratio)
        with torch.inference_mode():
            preds, fps = run_dataset(tracker, seqs, box_dir)
        name = f'OSTrack-{targs["model"]}'
    log.info(f'boxes written to {box_dir}; {fps:.1f} fps (model + crop, image decoding excluded)')
    if args.no_eval:
        return None
    results = evaluate(preds, seqs)
    results['fps'] = fps
    results['tracker'] = name
    with open(os.path.join(args.output_dir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    plot_curves({name: results}, os.path.join(args.output_dir, ''))
    o = results['overall']
    log.info(f'{name}: AUC {o["auc"]:.2f}  precision@20px {o["precision"]:.2f}  norm. precision@0.2 '
             f'{o["norm_precision"]:.2f}  ({results["n_sequences"]} sequences, {fps:.1f} fps); '
             f'results.json, success.png, precision.png in {args.output_dir}')
    return results


if __name__ == '__main__':
    main(get_args_parser().parse_args())
