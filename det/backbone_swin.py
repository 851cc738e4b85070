"""Swin backbone for detection: the stage maps of a models_swin Swin (strides 4/8/16/32 for Swin-T, widths C/2C/4C/8C)
through torchvision's FeaturePyramidNetwork.

The stages are models_swin's, unchanged (same keys, same window/shift code), so util/pretrained loads any Swin
checkpoint into the backbone: a Swin classifier (timm layout), UM-MAE (position MLP), SimMIM (tables resized to the
window). Any input size works: the image is padded so that every stage's map splits into whole windows and every
patch merging sees an even map; the relative-position tables keep the window size they were trained for, and each
stage builds its shift mask for the grid it actually gets. The maps are cropped back to the unpadded extent.

References:
  Swin   - Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021 (Mask
           R-CNN on the four stage outputs with an FPN, a LayerNorm on each output, drop path 0.2 for Swin-T).
  FPN    - Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017 (torchvision.ops
           FeaturePyramidNetwork, LastLevelMaxPool for the RPN's extra level).
  UM-MAE - Li et al., 2022, and SimMIM - Xie et al., CVPR 2022: the pre-trained Swin weights it starts from.
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

import models_swin


class SwinNet(nn.Module):
    """The Swin encoder of the detector: patch embed and stages of a models_swin.SwinTransformer (keys
    `patch_embed.*`, `layers.*`); no final norm, no head. Returns one map per stage."""

    def __init__(self, swin, act_checkpoint=False):
        super().__init__()
        self.patch_embed, self.layers = swin.patch_embed, swin.layers
        self.depths = swin.depths  # util/lr_decay reads it: stage-aware layer ids
        self.patch_size = swin.patch_embed.patch_size
        self.dims = [stage.blocks[0].norm1.normalized_shape[0] for stage in self.layers]
        self.strides = [self.patch_size * 2 ** s for s in range(len(self.layers))]
        # pad to a multiple of every stage's stride x window: whole windows everywhere, even maps at every merge
        self.size_divisible = math.lcm(*(st * stage.window_size for st, stage in zip(self.strides, self.layers)))
        self.act_checkpoint = act_checkpoint

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'relative_position_bias_table'}

    def forward(self, x):
        """[N, C, H, W], any H, W -> one map per stage, [N, ceil(H/s), ceil(W/s), C_s] for stride s (channels last)."""
        H, W = x.shape[-2:]
        m = self.size_divisible
        x = F.pad(x, (0, -W % m, 0, -H % m))  # bottom/right zeros: the mean colour after normalisation
        x = self.patch_embed(x)  # [N, Hp/p, Wp/p, D]
        outs = []
        for stage, stride in zip(self.layers, self.strides):
            if self.act_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)[0]  # recompute the stage's blocks in backward
            else:
                x = stage(x)[0]  # [N, Hp/s, Wp/s, C_s]
            outs.append(x[:, :-(-H // stride), :-(-W // stride)])  # the padding cut off again
        return outs


class MaxPoolLevels(ExtraFPNBlock):
    """LastLevelMaxPool repeated: `names` more levels, each the stride-2 subsampling of the one before (a Swin with
    fewer than four stages, like the demo's, still gives the RPN five levels)."""

    def __init__(self, names):
        super().__init__()
        self.names = list(names)

    def forward(self, results, x, names):
        for name in self.names:
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2))
            names.append(name)
        return results, names


class SwinFPNBackbone(nn.Module):
    """Swin + FPN for torchvision's detection models.

    Each stage map gets a LayerNorm (as Swin's detection backbone), then torchvision's FeaturePyramidNetwork (1x1
    lateral + 3x3 output convs, top-down sum) turns them into `out_channels` maps named by stride ('p2'..'p5' for
    Swin-T) plus max-pooled levels up to `num_levels` for the RPN ('pool', stride 64, torchvision's
    LastLevelMaxPool, for a 4-stage Swin). `names` are the first four levels: the ones RoIAlign reads."""

    def __init__(self, net, out_channels=256, num_levels=5):
        super().__init__()
        self.net = net
        self.out_channels = out_channels
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in net.dims)
        self.stage_names = [f'p{int(math.log2(s))}' for s in net.strides]
        n_extra = num_levels - len(net.strides)
        if n_extra < 1:
            raise ValueError(f'a {len(net.strides)}-stage Swin gives more than {num_levels - 1} pyramid levels')
        last = int(math.log2(net.strides[-1]))
        extra = LastLevelMaxPool() if n_extra == 1 else MaxPoolLevels(f'p{last + i + 1}' for i in range(n_extra))
        self.fpn = FeaturePyramidNetwork(net.dims, out_channels, extra_blocks=extra)
        self.names = (self.stage_names + getattr(extra, 'names', ['pool']))[:num_levels - 1]

    def forward(self, x):
        maps = OrderedDict((name, norm(m).permute(0, 3, 1, 2))  # [N, C_s, H/s, W/s]
                           for name, norm, m in zip(self.stage_names, self.norms, self.net(x)))
        return self.fpn(maps)


def build_swin_fpn_backbone(model='swin_tiny_patch4_window7_224', pretrain_img_size=224, drop_path_rate=0.2,
                            act_checkpoint=False, out_channels=256, **swin_kwargs):
    """A Swin + FPN backbone around the models_swin factory `model` (preset overrides, e.g. rel_pos='mlp' for a
    UM-MAE checkpoint, go in swin_kwargs). `pretrain_img_size` sets the stages' window sizes as in pre-training (a
    window larger than a stage's map there shrinks to it), so the checkpoint's relative-position tables fit."""
    swin = models_swin.create_model(model, img_size=pretrain_img_size, num_classes=0, drop_path_rate=drop_path_rate,
                                    **swin_kwargs)
    return SwinFPNBackbone(SwinNet(swin, act_checkpoint), out_channels)
