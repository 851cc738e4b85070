"""ViTDet backbone: a plain ViT of models_vit.py with window attention, and a simple feature pyramid.

The blocks are models_vit.Block, unchanged (same keys, same residual/MLP code); window attention is added by two
forward hooks on a block's `attn` that cut the normalised tokens into non-overlapping windows before attention and
put them back after, so a window block attends only inside its window and a global block over the whole map.

References:
  ViTDet   - Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022
             (window attention + 4 global blocks, simple feature pyramid, abs pos-embed interpolated to the input).
  detectron2 projects/ViTDet - the layout (`net` / `simfp_{stage}` names, LayerNorm in the pyramid, last-level max
             pool for the RPN).
  MAE-Lite - Wang et al., ICML 2023 (ViT-T Mask R-CNN at 640 px with this backbone).
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch.utils.checkpoint import checkpoint

import models_vit
from util.pos_embed import interpolate_pos_embed


def window_partition(x, grid, window):
    """Cut tokens of an h x w grid into non-overlapping window x window windows, zero-padding the grid at the
    bottom/right to multiples of `window` (as ViTDet does, after norm1).

    Args: x [N, h*w, D] in raster order; grid (h, w); window size in tokens.
    Returns: windows [N*nh*nw, window*window, D] and the padded grid (Hp, Wp).
    """
    N, _, D = x.shape
    h, w = grid
    ph, pw = -h % window, -w % window
    x = F.pad(x.view(N, h, w, D), (0, 0, 0, pw, 0, ph))  # [N, Hp, Wp, D]
    Hp, Wp = h + ph, w + pw
    x = x.view(N, Hp // window, window, Wp // window, window, D).transpose(2, 3)  # [N, nh, nw, win, win, D]
    return x.reshape(-1, window * window, D), (Hp, Wp)


def window_unpartition(windows, grid, padded, window):
    """Inverse of window_partition. Args: windows [N*nh*nw, window*window, D]. Returns [N, h*w, D] (padding cut)."""
    (h, w), (Hp, Wp) = grid, padded
    D = windows.shape[-1]
    nh, nw = Hp // window, Wp // window
    x = windows.view(-1, nh, nw, window, window, D).transpose(2, 3).reshape(-1, Hp, Wp, D)  # [N, Hp, Wp, D]
    return x[:, :h, :w].reshape(-1, h * w, D)


class WindowAttention:
    """Restricts a models_vit.Attention to windows through forward hooks: the pre-hook partitions its input
    (the block's norm1 output), the post-hook un-partitions its output. The owner sets `grid` (h, w) before each
    forward. Hooks keep the Block's forward and state-dict keys exactly those of models_vit."""

    def __init__(self, attn, window):
        self.window = window
        self.grid = None
        attn.register_forward_pre_hook(self.partition)
        attn.register_forward_hook(self.unpartition)

    def padded(self):
        h, w = self.grid
        return h + -h % self.window, w + -w % self.window

    def partition(self, module, args):
        x, *rest = args
        return (window_partition(x, self.grid, self.window)[0], *rest)

    def unpartition(self, module, args, out):
        return window_unpartition(out, self.grid, self.padded(), self.window)


def evenly_spaced(depth, n=4):
    """Indices of n evenly spaced blocks ending at the last one: depth 12 -> (2, 5, 8, 11), as in ViTDet."""
    return tuple(sorted({max(0, round(depth * (i + 1) / n) - 1) for i in range(n)}))


class ViTNet(nn.Module):
    """The plain ViT of ViTDet: patch embed, abs pos-embed (stored at the pre-training grid, with its cls row, and
    bicubic-interpolated to the input's grid every forward), models_vit blocks; no cls token, no final norm.
    Keys are those of models_vit (`patch_embed.proj.*`, `pos_embed`, `blocks.{i}.*`), so util/pretrained loads it."""

    def __init__(self, vit, window_size=14, global_blocks=None, act_checkpoint=False):
        super().__init__()
        self.patch_embed, self.pos_embed, self.blocks = vit.patch_embed, vit.pos_embed, vit.blocks
        self.embed_dim = vit.embed_dim
        self.patch_size = self.patch_embed.patch_size[0]
        self.global_blocks = tuple(evenly_spaced(len(self.blocks)) if global_blocks is None else global_blocks)
        self.window_size = window_size
        self.act_checkpoint = act_checkpoint
        # plain list (not a module list): hook helpers hold no weights
        self.windows = [None if i in self.global_blocks or not window_size else WindowAttention(blk.attn, window_size)
                        for i, blk in enumerate(self.blocks)]

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed'}

    def forward(self, x):
        """[N, C, H, W] (H, W multiples of the patch size) -> [N, D, H/p, W/p]."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.patch_embed(x)  # [N, h*w, D]
        x = x + interpolate_pos_embed(self.pos_embed, grid, num_prefix=1)[:, 1:]  # cls row dropped: [1, h*w, D]
        for blk, win in zip(self.blocks, self.windows):
            if win is not None:
                win.grid = grid
            if self.act_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *grid)  # [N, D, h, w]


def pyramid_stage(dim, out_dim, scale):
    """One level of the simple feature pyramid: resample the stride-p map by `scale` (2^k deconvs with LayerNorm +
    GELU between them, identity, or max-pool), then 1x1 and 3x3 convs (no bias) each followed by LayerNorm."""
    layers = []
    if scale > 1:
        for i in range(int(round(math.log2(scale)))):
            if i:
                layers += [LayerNorm2d(dim), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
            dim //= 2
    elif scale < 1:
        k = int(round(1 / scale))
        layers.append(nn.MaxPool2d(kernel_size=k, stride=k))
    layers += [nn.Conv2d(dim, out_dim, 1, bias=False), LayerNorm2d(out_dim),
               nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm2d(out_dim)]
    return nn.Sequential(*layers)


class ViTDetBackbone(nn.Module):
    """ViT + simple feature pyramid for torchvision's detection models.

    Returns an OrderedDict of maps with `out_channels` channels at strides 4, 8, 16, 32 ('p2'..'p5', built from the
    last ViT map at stride p by deconvs / identity / max-pool) plus 'pool' at stride 64 (max-pool of p5, for the
    RPN only). For p = 16 the scales are ViTDet's (4, 2, 1, 1/2); other patch sizes (the demo's p = 4) get the
    scales that give the same strides.
    """

    def __init__(self, net, out_channels=256, strides=(4, 8, 16, 32)):
        super().__init__()
        self.net = net
        self.out_channels = out_channels
        self.strides = tuple(strides)
        for s in strides:
            self.add_module(f'simfp_{int(math.log2(s))}', pyramid_stage(net.embed_dim, out_channels,
                                                                        net.patch_size / s))
        self.names = [f'p{int(math.log2(s))}' for s in strides]

    def forward(self, x):
        feat = self.net(x)  # [N, D, H/p, W/p]
        out = OrderedDict((name, getattr(self, f'simfp_{name[1:]}')(feat)) for name in self.names)
        out['pool'] = F.max_pool2d(out[self.names[-1]], kernel_size=1, stride=2)  # stride 2 x the last level
        return out


def build_vitdet_backbone(model='vit_tiny_patch16', pretrain_img_size=224, window_size=14, global_blocks=None,
                          drop_path_rate=0.1, act_checkpoint=False, out_channels=256, **vit_kwargs):
    """A ViTDet backbone around the models_vit factory `model` (any preset override goes in vit_kwargs).

    `pretrain_img_size` is the grid the pos-embed is stored at (224 for ImageNet checkpoints), so pre-trained
    weights load unchanged and are interpolated to each input on the fly. The factory's cls token, final norm and
    head are not used in detection and are dropped."""
    vit = models_vit.create_model(model, img_size=pretrain_img_size, num_classes=0, drop_path_rate=drop_path_rate,
                                  **vit_kwargs)
    net = ViTNet(vit, window_size, global_blocks, act_checkpoint)
    return ViTDetBackbone(net, out_channels)
