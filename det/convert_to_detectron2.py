"""Export pre-trained ViT weights to detectron2's ViTDet key layout, for users who run the official ViTDet configs.
ViT only: the Swin + FPN backbone (det/backbone_swin.py) has no detectron2 exporter.

  python det/convert_to_detectron2.py mae_tiny_400e.pth.tar vit_t_d2.pth --model vit_tiny_patch16
  # detectron2 config (e.g. MAE-Lite's mask_rcnn_vitdet_t_100ep.py): train.init_checkpoint = "vit_t_d2.pth"

The input is anything util/pretrained.py loads (MAE, MAE-Lite, TinyMIM, MoCo-v3, timm, this repo's checkpoints).
Output: {'model': {name: tensor}} with detectron2's names: `backbone.net.patch_embed.proj.*`, `backbone.net.pos_embed`
(the pre-training grid with its cls row: detectron2's `pretrain_use_cls_token=True`, it interpolates at run time),
`backbone.net.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, and - with `use_rel_pos=True`, as in
the official configs - zero `attn.rel_pos_h/w` of the size the config builds (what detectron2 initialises them to),
so the checkpoint loads with no missing backbone.net key. LayerScale (ls1/ls2.gamma), which detectron2's ViT lacks,
is folded into attn.proj / mlp.fc2. cls token, final norm and head are not part of detectron2's ViT and are left out.

References: detectron2 projects/ViTDet (modeling/backbone/vit.py names, configs/common/models/mask_rcnn_vitdet.py),
MAE-Lite projects/eval_tools/det (ViT-T config: 640 px, window 14, global blocks 2/5/8/11).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python det/...`

import argparse  # noqa: E402
import logging  # noqa: E402
from collections import OrderedDict  # noqa: E402

import torch  # noqa: E402

import models_swin  # noqa: E402
import models_vit  # noqa: E402
from det.backbone import evenly_spaced  # noqa: E402
from util.checkpoint import load_file  # noqa: E402
from util.pretrained import load_pretrained, unwrap_state_dict  # noqa: E402

log = logging.getLogger('mim')
BLOCK_KEYS = ('norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
              'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')


def convert(checkpoint, model='vit_tiny_patch16', pretrain_img_size=224, img_size=640, window_size=14,
            global_blocks=None, rel_pos=True, prefix='backbone.net.'):
    """Our ViT weights (a path or a state dict, any layout the shared loader accepts) -> detectron2 ViTDet
    state dict (OrderedDict). `img_size`, `window_size` and `global_blocks` only set the rel-pos table sizes."""
    raw = load_file(checkpoint) if isinstance(checkpoint, str) else checkpoint
    keys = list(unwrap_state_dict(raw))
    layer_scale = any(k.endswith(('.ls1.gamma', '.gamma_1')) for k in keys)  # build LayerScale so it loads
    vit = models_vit.create_model(model, img_size=pretrain_img_size, num_classes=0,
                                  **({'init_values': 1.0} if layer_scale else {}))
    if any('relative_position_bias_table' in k for k in keys):
        log.warning('the checkpoint has BEiT-style relative position tables: detectron2\'s ViT cannot use them, '
                    'they are left out')
    load_pretrained(vit, raw)
    sd = vit.state_dict()
    depth, patch = len(vit.blocks), vit.patch_embed.patch_size[0]
    head_dim = vit.blocks[0].attn.head_dim
    global_blocks = evenly_spaced(depth) if global_blocks is None else tuple(global_blocks)
    out = OrderedDict()
    out[prefix + 'patch_embed.proj.weight'] = sd['patch_embed.proj.weight']
    out[prefix + 'patch_embed.proj.bias'] = sd['patch_embed.proj.bias']
    out[prefix + 'pos_embed'] = sd['pos_embed']  # [1, 1 + (224/p)^2, D]
    for i in range(depth):
        b = f'blocks.{i}.'
        if b + 'attn.qkv.bias' not in sd:  # qkv_bias=False models: detectron2's config has qkv_bias=True
            sd[b + 'attn.qkv.bias'] = torch.zeros(sd[b + 'attn.qkv.weight'].shape[0])
        for k in BLOCK_KEYS:
            out[prefix + b + k] = sd[b + k].clone()
        for ls, layer in (('ls1', 'attn.proj'), ('ls2', 'mlp.fc2')):  # gamma * (W x + b) = (gamma W) x + gamma b
            if b + ls + '.gamma' in sd:
                gamma = sd[b + ls + '.gamma']
                out[prefix + b + layer + '.weight'] *= gamma[:, None]
                out[prefix + b + layer + '.bias'] *= gamma
        if rel_pos:
            size = img_size // patch if i in global_blocks else window_size  # tokens per side the block attends
            out[prefix + b + 'attn.rel_pos_h'] = torch.zeros(2 * size - 1, head_dim)
            out[prefix + b + 'attn.rel_pos_w'] = torch.zeros(2 * size - 1, head_dim)
    return out


def get_args_parser():
    p = argparse.ArgumentParser('Export ViT weights to detectron2 ViTDet layout')
    p.add_argument('checkpoint', help='pre-trained weights (any layout util/pretrained.py accepts)')
    p.add_argument('output', help='where to write the detectron2 checkpoint (.pth)')
    p.add_argument('--model', default='vit_tiny_patch16', help='ViT factory in models_vit.py the weights belong to')
    p.add_argument('--pretrain_img_size', type=int, default=224,
                   help='pos-embed grid to store (detectron2\'s pretrain_img_size, 224 in every official config)')
    p.add_argument('--img_size', type=int, default=640,
                   help='detectron2 config\'s net.img_size (640 MAE-Lite ViT-T, 1024 ViTDet B/L/H): sizes the '
                        'global blocks\' rel-pos tables')
    p.add_argument('--window_size', type=int, default=14, help='detectron2 config\'s net.window_size')
    p.add_argument('--global_blocks', type=int, nargs='*', default=None,
                   help='blocks NOT in window_block_indexes (default 4 evenly spaced: 2 5 8 11 for depth 12)')
    p.add_argument('--rel_pos', action=argparse.BooleanOptionalAction, default=True,
                   help='write zero rel_pos_h/w tables (the official configs use use_rel_pos=True)')
    return p


def main(args):
    if models_swin.has_model(args.model):
        raise ValueError(f'--model {args.model}: the detectron2 export is for ViTDet (ViT) backbones only')
    sd = convert(args.checkpoint, args.model, args.pretrain_img_size, args.img_size, args.window_size,
                 args.global_blocks, args.rel_pos)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({'model': sd}, args.output)
    log.info(f'wrote {len(sd)} tensors in detectron2 ViTDet layout to {args.output}')
    return sd


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    main(get_args_parser().parse_args())
