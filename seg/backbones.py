"""Our encoders as mmsegmentation backbones/necks: the ViT of models_vit.py with 4 intermediate outputs, and the
channel-reducing feature pyramid of MAE-Lite's Semantic-FPN.

Importing this module registers `MIMViT`, `MIMSwin` and `ScaledFeature2Pyramid` in mmseg's MODELS registry (that
is how mmseg configs find classes; the configs list this module in `custom_imports`).

The ViT subclasses models_vit.VisionTransformer and the Swin models_swin.SwinTransformer (nothing
re-implemented), so their parameter names are the timm/
checkpoint names (`backbone.patch_embed.*`, `backbone.cls_token`, `backbone.pos_embed`, `backbone.blocks.N.*`):
the shared loader (util/pretrained.py) fills it directly and the layer-decay constructor (seg/layer_decay.py)
reads block ids straight off the names. The ×4/×2/×1/×0.5 rescaling is the neck (mmseg's `Feature2Pyramid` for
UperNet, `ScaledFeature2Pyramid` below for ML's 48-channel Semantic-FPN), as in mmseg's own MAE/BEiT configs.

References:
  BEiT / MAE semantic segmentation (Bao et al. ICLR 2022; He et al. CVPR 2022): blocks 3/5/7/11 of a plain ViT,
      rescaled ×4 (deconv-BN-GELU-deconv), ×2 (deconv), ×1, ×0.5 (max-pool), UperNet head.
  MAE-Lite (Wang et al., ICML 2023): Semantic-FPN on ViT-Tiny with the pyramid reduced to 48 channels (embed/4).
  TinyMIM (Ren et al., CVPR 2023): UperNet recipe for ViT-Tiny. BEiT: relative position bias resized to the crop.
  Swin (Liu et al., ICCV 2021) / UM-MAE (Li et al., 2022): UperNet on the 4 stage outputs, each with a LayerNorm.
"""
import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmseg.registry import MODELS

from models_swin import SwinTransformer
from models_vit import VisionTransformer, run_blocks
from util.lr_decay import layer_id_swin, layer_id_vit
from util.pos_embed import interpolate_pos_embed
from util.checkpoint import load_file
from util.pretrained import load_pretrained, strip_prefixes, unwrap_state_dict

log = logging.getLogger(__name__)


@MODELS.register_module()
class MIMViT(VisionTransformer):
    """Plain ViT returning the outputs of blocks `out_indices` as stride-p feature maps, [N, D, H/p, W/p] each.

    Args:
        img_size: the training crop; the position embedding (and the RPE tables) are sized to its patch grid.
            Other input sizes get the position embedding interpolated on the fly (not possible with RPE).
        out_indices: 0-based block indices (BEiT/MAE: 3, 5, 7, 11). Blocks after the last one are dropped.
        drop_path_rate: stochastic depth, linear in depth (0.1 in the UperNet / Semantic-FPN recipes).
        rel_pos_bias: MAE-Lite's RPE model (BEiT-style relative position bias per block, q/v biases).
        pretrained: a checkpoint of ours (or MAE / MAE-Lite / TinyMIM / timm) loaded in `init_weights()` through
            util.pretrained.load_pretrained (pos-embed interpolated to the crop grid, key report logged);
            RPE tables of another grid are resized bicubically (BEiT).
        The other arguments are VisionTransformer's.
    """

    def __init__(self, img_size=512, patch_size=16, in_chans=3, embed_dim=192, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1,
                 init_values=None, rel_pos_bias=False, out_indices=(3, 5, 7, 11), pretrained=None):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         global_pool='avg', embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=drop_path_rate, init_values=init_values, rel_pos_bias=rel_pos_bias)
        if not out_indices or max(out_indices) >= depth:
            raise ValueError(f'out_indices {out_indices} must be block indices below depth {depth}')
        self.out_indices = tuple(out_indices)
        # the pyramid takes raw block outputs: no final norm, no pooling, no head (and no unused parameters for DDP)
        self.fc_norm = nn.Identity()
        del self.blocks[max(out_indices) + 1:]
        self.pretrained = pretrained

    def init_weights(self):
        """Called by mmengine's Runner before training: load `pretrained` through the shared loader."""
        if self.pretrained:
            load_backbone_weights(self, self.pretrained, extra_rows=3)

    def lr_layers(self):
        """(layer_id_fn(name, num_layers), num_layers) for seg/layer_decay.py: ViT ids, blocks.i -> i + 1."""
        return layer_id_vit, len(self.blocks) + 1

    def forward(self, x):
        N, _, H, W = x.shape
        p = self.patch_embed.patch_size[0]
        h, w = H // p, W // p
        pos = self.pos_embed
        if (h, w) != self.patch_embed.grid_size:  # whole-image inference at another size
            if self.blocks[0].attn.relative_position_bias_table is not None:
                raise ValueError(f'the RPE model runs at its crop grid {self.patch_embed.grid_size}, got {(h, w)}: '
                                 "use slide inference (test_cfg mode='slide') at the training crop size")
            pos = interpolate_pos_embed(pos, (h, w))  # [1, 1+h*w, D]
        tokens = self.patch_embed(x) + pos[:, 1:]  # [N, h*w, D]
        cls = (self.cls_token + pos[:, :1]).expand(N, -1, -1)  # [N, 1, D]
        tokens = self.pos_drop(torch.cat([cls, tokens], dim=1))  # [N, 1+h*w, D]
        _, outs, _ = run_blocks(self.blocks, tokens, return_layers=self.out_indices)
        # drop cls, tokens -> maps: [N, 1+h*w, D] -> [N, D, h, w]
        return tuple(outs[i][:, 1:].transpose(1, 2).reshape(N, -1, h, w) for i in self.out_indices)


def resize_rel_pos_table(table, size, extra_rows=0):
    """Resize a relative-position table [R*C + extra_rows, H] of a square R x C offset grid (BEiT: R = 2h-1 and
    3 extra cls rows; Swin: R = 2w-1, none) to a `size` = (R', C') grid by bicubic interpolation; the extra rows are
    kept. Returns [R'*C' + extra_rows, H]."""
    n = table.shape[0] - extra_rows
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f'relative position table with {table.shape[0]} rows is not from a square offset grid')
    heads = table.shape[1]
    grid = table[:n].T.reshape(1, heads, side, side).float()  # [1, H, R, C]
    grid = F.interpolate(grid, size=tuple(size), mode='bicubic', align_corners=False)  # [1, H, R', C']
    grid = grid.reshape(heads, -1).T.to(table.dtype)  # [R'*C', H]
    return torch.cat([grid, table[n:]], dim=0)


def load_backbone_weights(model, path, extra_rows, fresh_prefixes=()):
    """util.pretrained.load_pretrained, after two backbone-specific steps: relative position tables of another
    size are resized bicubically (BEiT's recipe for a larger crop / window), and parameters the pre-training never
    had (`fresh_prefixes`, e.g. Swin's per-output norms) keep their fresh initialisation instead of counting as
    missing. Returns load_pretrained's report."""
    sd = strip_prefixes(unwrap_state_dict(load_file(path)))
    own = model.state_dict()
    resized = []
    for k, v in sd.items():
        if k.endswith('relative_position_bias_table') and k in own and v.shape != own[k].shape:
            side = int(round((own[k].shape[0] - extra_rows) ** 0.5))
            sd[k] = resize_rel_pos_table(v, (side, side), extra_rows)
            resized.append(k)
    if resized:
        log.info(f'{path}: resized {len(resized)} relative position tables to {tuple(own[resized[0]].shape)}')
    sd.update({k: v for k, v in own.items() if k.startswith(tuple(fresh_prefixes))})
    report = load_pretrained(model, sd)
    log.info(f'{path}: loaded into {type(model).__name__}')
    return report


@MODELS.register_module()
class MIMSwin(SwinTransformer):
    """Swin returning its stage outputs (strides 4/8/16/32 for patch 4), each through a new LayerNorm
    (`out_norms.i`, as Swin's segmentation backbone), [N, C_s, H_s, W_s].

    Args: as models_swin.SwinTransformer (rel_pos 'table' or UM-MAE's 'mlp'), plus `out_indices` (stages) and
    `pretrained` (our / UM-MAE / SimMIM / timm Swin weights through util/pretrained.load_pretrained; bias tables of
    another window size are resized bicubically). Every stage map must split into whole windows: with a 512 crop
    and patch 4 the maps are 128/64/32/16, so use window 8 or 16 (7, Swin's ImageNet window, does not divide them).
    """

    def __init__(self, img_size=512, patch_size=4, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=8, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.3, rel_pos='table', out_indices=(0, 1, 2, 3), pretrained=None):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=drop_path_rate, rel_pos=rel_pos, fc_norm=False)
        self.out_indices = tuple(out_indices)
        self.norm = nn.Identity()  # replaced by one norm per output
        self.out_norms = nn.ModuleList([nn.LayerNorm(embed_dim * 2 ** s) for s in self.out_indices])
        del self.layers[max(self.out_indices) + 1:]
        self.pretrained = pretrained

    def init_weights(self):
        """Called by mmengine's Runner before training: load `pretrained` through the shared loader."""
        if self.pretrained:
            load_backbone_weights(self, self.pretrained, extra_rows=0, fresh_prefixes=('out_norms.',))

    def lr_layers(self):
        """Stage-aware ids of util.lr_decay.layer_id_swin; the output norms get the top id (scale 1)."""
        return functools.partial(layer_id_swin, depths=self.depths), sum(self.depths) + 1

    def forward(self, x):
        x, coords, extent = self.patch_embed(x), None, None  # [N, H/p, W/p, C]
        outs = []
        for s, stage in enumerate(self.layers):
            x, coords, extent = stage(x, coords, extent)  # [N, h_s, w_s, C_s]
            if s in self.out_indices:
                norm = self.out_norms[self.out_indices.index(s)]
                outs.append(norm(x).permute(0, 3, 1, 2).contiguous())  # [N, C_s, h_s, w_s]
        return tuple(outs)


@MODELS.register_module()
class ScaledFeature2Pyramid(nn.Module):
    """MAE-Lite's Semantic-FPN neck: four same-stride ViT maps -> strides ×4, ×2, ×1, ×0.5 of the patch stride with
    `out_channels` (48 for ViT-Tiny, embed/4) channels: deconv-norm-GELU-deconv, deconv, 1×1 conv, 1×1 conv +
    max-pool. (With out_channels == embed_dim and no projections this is mmseg's Feature2Pyramid, used for UperNet.)

    Args: embed_dim (input channels), out_channels, norm_cfg (SyncBN in the recipes; mmengine turns it into BN
    when not distributed). Input: 4 maps [N, D, h, w]. Returns 4 maps [N, C, 4h, 4w] ... [N, C, h/2, w/2].
    """

    def __init__(self, embed_dim, out_channels=48, norm_cfg=dict(type='SyncBN', requires_grad=True)):
        super().__init__()
        D, C = embed_dim, out_channels
        self.up4 = nn.Sequential(nn.ConvTranspose2d(D, C, 2, stride=2), build_norm_layer(norm_cfg, C)[1], nn.GELU(),
                                 nn.ConvTranspose2d(C, C, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(D, C, 2, stride=2)
        self.same = nn.Conv2d(D, C, 1)
        self.down2 = nn.Sequential(nn.Conv2d(D, C, 1), nn.MaxPool2d(2, stride=2))

    def forward(self, inputs):
        if len(inputs) != 4:
            raise ValueError(f'expected 4 feature maps, got {len(inputs)}')
        return tuple(op(x) for op, x in zip((self.up4, self.up2, self.same, self.down2), inputs))
