"""Export a tracker trained with track/train.py to the official OSTrack code's key layout, for users who evaluate with
its toolkit (lib/test on LaSOT, GOT-10k, TrackingNet servers).

  python track/export_ostrack.py out/ostrack_vit_tiny/checkpoint-last.pth OSTrack_ep0300.pth.tar
  # OSTrack: build its network with the same width/depth/heads, patch size, search size and head channels
  # (cfg.MODEL.HEAD.NUM_CHANNELS), then network.load_state_dict(torch.load(path)['net'], strict=True)

Output: {'net': {name: tensor}} as OSTrack's trainer saves it:
  backbone.{cls_token, pos_embed}: the plain ViT's, which OSTrack's tracking forward never reads (cls token off);
      written as zeros of the shapes OSTrack builds (a `--img_size` 224 grid plus the cls row), so strict loading
      succeeds;
  backbone.{pos_embed_z, pos_embed_x, patch_embed.proj.*, blocks.{i}.*, norm.*}: ours, same names (timm's);
  box_head.conv{1-4}_{ctr,offset,size}.{0: conv, 1: BatchNorm}.*, box_head.conv5_{ctr,offset,size}.*: our
      `box_head.{ctr,offset,size}.{0-3}` stacks and their final 1x1 convs.
The two models then compute the same boxes without candidate elimination. With it, OSTrack removes tokens inside its
CE block (between attention and MLP), this repo after the whole block (track/model.py): same keys, slightly different
features at the CE layers.

References: OSTrack (Ye et al., ECCV 2022) lib/models/ostrack (VisionTransformerCE, BaseBackbone.finetune_track),
lib/models/layers/head.py (CenterPredictor).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python track/…`

import argparse  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
from collections import OrderedDict  # noqa: E402

import torch  # noqa: E402

from util.checkpoint import load_file  # noqa: E402
from util.pretrained import unwrap_state_dict  # noqa: E402

log = logging.getLogger('mim')
HEAD = re.compile(r'^box_head\.(ctr|offset|size)\.(\d)\.(.+)$')  # ours: box_head.<branch>.<layer>.<rest>


def convert(checkpoint, img_size=224):
    """A track/train.py checkpoint (path or state dict) -> OSTrack's state dict (OrderedDict)."""
    sd = unwrap_state_dict(load_file(checkpoint) if isinstance(checkpoint, str) else checkpoint)
    if 'pos_embed_x' not in sd or not any(k.startswith('box_head.') for k in sd):
        raise ValueError('not a track/train.py checkpoint: it has no pos_embed_x / box_head.* (export a trained '
                         'tracker, not a pre-trained encoder)')
    embed_dim, patch = sd['patch_embed.proj.weight'].shape[0], sd['patch_embed.proj.weight'].shape[-1]
    out = OrderedDict()
    out['backbone.cls_token'] = torch.zeros(1, 1, embed_dim)
    out['backbone.pos_embed'] = torch.zeros(1, (img_size // patch) ** 2 + 1, embed_dim)
    for k, v in sd.items():
        m = HEAD.match(k)
        if m is None:
            out['backbone.' + k] = v.clone()
            continue
        branch, layer, rest = m.groups()
        out[f'box_head.conv{int(layer) + 1}_{branch}.{rest}'] = v.clone()  # layer 4 is the 1x1 conv: conv5_*
    return out


def get_args_parser():
    p = argparse.ArgumentParser('Export a track/train.py tracker to the official OSTrack layout')
    p.add_argument('checkpoint', help='a track/train.py checkpoint (checkpoint-last.pth)')
    p.add_argument('output', help="where to write OSTrack's checkpoint ({'net': state dict})")
    p.add_argument('--img_size', type=int, default=224,
                   help="the image size OSTrack builds its backbone at (sizes the unused plain pos_embed; 224 in "
                        'every OSTrack config)')
    return p


def main(args):
    sd = convert(args.checkpoint, args.img_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({'net': sd}, args.output)
    log.info(f'wrote {len(sd)} tensors in OSTrack layout to {args.output}')
    return sd


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    main(get_args_parser().parse_args())
