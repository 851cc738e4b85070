"""Pyramid Vision Transformer (PVT v1) encoders and UM-MAE pre-training on them.

References:
  PVT      - Wang et al., "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without
             Convolutions", ICCV 2021 (four stages of non-overlapping patch embeddings, spatial-reduction attention,
             PVT-S: 64-128-320-512, depths 3-4-6-3, heads 1-2-5-8, mlp ratios 8-8-4-4, sr ratios 8-4-2-1; its
             key names patch_embed{s} / block{s} / attn.q / attn.kv / attn.sr).
  UM-MAE   - Li et al., "Uniform Masking: Enabling MAE Pre-training for Pyramid-based Vision Transformers with
             Locality", 2022 (PVT-S pre-trained on the packed visible units with sr ratios 4-2-1-1).
  MAE      - He et al., CVPR 2022 (2-D sin-cos positions; GAP + fc_norm fine-tuning layout).

Layout: tokens travel as [B, H, W, C] maps, as in models_swin.py. The masking, packing, decoder and loss of UM-MAE
are models_swin.UniformMaskingMAE's; this file adds the PVT encoder and how it reads a packed map.

Two choices differ from PVT v1, both for UM-MAE:
  - Positions are fixed 2-D sin-cos per stage (not learned tables). Packing needs an embedding that is a function
    of a token's coordinate: a packed token gets the sin-cos of the coordinate it had in the full map. Keeping the
    same function at fine-tuning gives every token exactly the embedding pre-training gave it there, at any input
    size, with nothing to interpolate or convert. The tables are non-persistent buffers (not in checkpoints).
  - No cls token: the classifier reads the mean of the last stage's tokens through `fc_norm` (fc_norm=True, the MAE
    fine-tuning layout; the `norm` layout of fc_norm=False is PVT's final norm before the mean). UM-MAE's decoder
    reads only the spatial tokens, so a cls token would reach fine-tuning untrained; GAP also makes PVT a drop-in for
    the Swin paths of the probes and the loader.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models_swin import ClassifierHead, PatchEmbed, SwinTransformer, UniformMaskingMAE, init_weights
from models_vit import Block, lookup
from util.pos_embed import get_2d_sincos_pos_embed


class SpatialReductionAttention(nn.Module):
    """PVT's attention: queries from every token, keys and values from the map reduced `sr_ratio` times per side by
    a stride-sr convolution + LayerNorm (`sr`, `norm`; absent when sr_ratio is 1). Keys `q`, `kv`, `proj` as PVT."""

    def __init__(self, dim, num_heads, sr_ratio=1, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, extras=None):
        """x [B, H, W, C] -> [B, H, W, C]. (`extras` is models_vit.Block's hook for attention maps; unused here.)"""
        B, H, W, C = x.shape
        r = self.sr_ratio
        if H % r or W % r:
            raise ValueError(f'a {H}x{W} map does not split into {r}x{r} spatial-reduction windows')
        q = self.q(x).view(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, HW, d]
        if r > 1:
            x = self.norm(self.sr(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2))  # [B, HW/r², C]
        else:
            x = x.reshape(B, H * W, C)
        kv = self.kv(x).view(B, -1, 2, self.num_heads, self.head_dim)  # [B, M, 2, h, d]
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # each [B, h, M, d]
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, H, W, C)  # [B, h, HW, d] -> [B, H, W, C]
        return self.proj_drop(self.proj(x))


class PVTBlock(Block):
    """models_vit's pre-norm block (LayerNorm eps 1e-6, as PVT) on [B, H, W, C] maps, with spatial-reduction
    attention in place of global attention."""

    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)


class PyramidVisionTransformer(nn.Module):
    """PVT v1 for classification: per stage a non-overlapping patch embedding (conv k = s = patch + LayerNorm), fixed
    2-D sin-cos positions and `depth` spatial-reduction blocks; then global average pooling and `head`.

    `embed_dim`, like `num_features`, is the output width (what the probes read, as for ViT and Swin)."""

    def __init__(self, img_size=224, patch_sizes=(4, 2, 2, 2), in_chans=3, num_classes=1000,
                 embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                 sr_ratios=(8, 4, 2, 1), qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 fc_norm=False):
        super().__init__()
        stages = len(depths)
        if any(len(v) != stages for v in (patch_sizes, embed_dims, num_heads, mlp_ratios, sr_ratios)):
            raise ValueError('patch_sizes, embed_dims, depths, num_heads, mlp_ratios and sr_ratios need one entry per '
                             f'stage; got {patch_sizes}, {embed_dims}, {depths}, {num_heads}, {mlp_ratios}, '
                             f'{sr_ratios}')
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.patch_sizes = tuple(patch_sizes)
        self.depths = tuple(depths)
        self.sr_ratios = tuple(sr_ratios)
        self.num_features = self.embed_dim = embed_dims[-1]
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # stochastic depth grows over all blocks
        res = img_size
        for s in range(stages):
            self.add_module(f'patch_embed{s + 1}', PatchEmbed(res, patch_sizes[s], embed_dims[s - 1] if s else in_chans,
                                                              embed_dims[s]))
            res //= patch_sizes[s]
            pos = get_2d_sincos_pos_embed(embed_dims[s], res).view(res, res, embed_dims[s])  # [H_s, W_s, C_s]
            self.register_buffer(f'pos_embed{s + 1}', pos, persistent=False)
            self.add_module(f'block{s + 1}', nn.ModuleList([
                PVTBlock(embed_dims[s], num_heads[s], mlp_ratios[s], sr_ratios[s], qkv_bias, drop_rate, attn_drop_rate,
                         dpr[sum(depths[:s]) + b]) for b in range(depths[s])]))
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(self.num_features, eps=1e-6)
        self.fc_norm = nn.LayerNorm(self.num_features, eps=1e-6) if fc_norm else nn.Identity()
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith(('mask_token', 'decoder_pos_embed'))}

    def position(self, s, x, coords=None):
        """Stage s's (0-based) sin-cos position embedding for the map x [B, H, W, C]: the table itself on a dense map
        ([1, H, W, C]); on UM's packed map, the table gathered at every token's coordinate in the full map,
        coords [B, H, W, 2] ([B, H, W, C])."""
        table = getattr(self, f'pos_embed{s + 1}').to(x.dtype)  # [H_s, W_s, C]
        if coords is not None:
            return table[coords[..., 0], coords[..., 1]]  # [B, H, W, C]
        if table.shape[:2] != x.shape[1:3]:
            raise ValueError(f'stage {s + 1} got a {x.shape[1]}x{x.shape[2]} map, but the model was built for '
                             f'{table.shape[0]}x{table.shape[1]}: pass img_size (--input_size) of the images')
        return table.unsqueeze(0)

    def forward_tokens(self, x, coords=None):
        """Run the stages from the first embedded map. x [B, H, W, D_1] (after patch_embed1); coords [B, H, W, 2]
        the tokens' coordinates in the full first-stage map (UM's packed map) or None (dense). Returns the last
        stage's map [B, h, w, C_last]."""
        for s in range(len(self.depths)):
            if s:
                p = self.patch_sizes[s]
                x = getattr(self, f'patch_embed{s + 1}')(x.permute(0, 3, 1, 2))  # [B, H/p, W/p, C_s]
                if coords is not None:  # each p x p group lies inside one unit (but at the last stage): its
                    coords = torch.div(coords[:, ::p, ::p], p, rounding_mode='floor')  # top-left coordinate, scaled
            x = x + self.position(s, x, coords)
            for blk in getattr(self, f'block{s + 1}'):
                x = blk(x)
        return x

    def forward_features(self, x):
        """[B, C, H, W] -> last-stage tokens [B, h, w, C_last] after `norm` (identity in the fc_norm layout)."""
        return self.norm(self.forward_tokens(self.patch_embed1(x)))

    # the classifier is Swin's: mean of the last map, `fc_norm` (identity in the norm layout), `head.fc`
    get_classifier, pool = SwinTransformer.get_classifier, SwinTransformer.pool
    forward_head, forward = SwinTransformer.forward_head, SwinTransformer.forward


class MaskedAutoencoderPVT(UniformMaskingMAE, PyramidVisionTransformer):
    """UM-MAE on PVT: the visible units (one per 2x2 block) packed into a dense quarter-size map, each token with the
    sin-cos position of its original coordinate; sr ratios halved (4-2-1-1 for PVT-S) so that the packed map's keys
    cover the same image area per key as the full map's at fine-tuning (8-4-2-1). Masking, decoder and loss are
    `UniformMaskingMAE`'s. Encoder keys equal `PyramidVisionTransformer`'s but for the sr convs, which
    util/pretrained.fit_sr_convs converts; `vis_mask_token`, `mask_token` and `decoder*` are pre-training only."""

    def __init__(self, img_size=256, patch_sizes=(4, 2, 2, 2), in_chans=3, embed_dims=(64, 128, 320, 512),
                 depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(4, 2, 1, 1),
                 drop_path_rate=0.0, decoder_embed_dim=512, decoder_depth=2, decoder_num_heads=16, norm_pix_loss=True,
                 vis_mask_ratio=0.25):
        super().__init__(img_size, patch_sizes, in_chans, 0, embed_dims, depths, num_heads, mlp_ratios, sr_ratios,
                         drop_path_rate=drop_path_rate)
        # a unit is one last-but-one-stage token: 16 px for PVT-S
        self.init_um(img_size, patch_sizes[0], math.prod(patch_sizes[:-1]), in_chans, embed_dims[0], 4.0,
                     decoder_embed_dim, decoder_depth, decoder_num_heads, norm_pix_loss, vis_mask_ratio)

    def forward_encoder(self, imgs, ids_keep, vis_mask):
        """Encode the packed visible units.

        Args: imgs [N, C, H, W]; ids_keep [N, K]; vis_mask [N, K] (1 = this visible unit shows `vis_mask_token`).
        Returns the last stage's packed map [N, G/4, G/4, C_last] after `norm`."""
        x, coords = self.embed_visible(imgs, ids_keep, vis_mask, self.patch_embed1)
        return self.norm(self.forward_tokens(x, coords))


def _make(cls, preset, kwargs):
    """Merge a factory's preset with the caller's kwargs; the caller wins (so any preset can be overridden)."""
    return cls(**{**preset, **kwargs})


SMALL = dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))
# 32 px demo digits: patches 2-2-2, three stages (16x16 -> 8x8 -> 4x4 tokens); UM units are 4 px, 8x8 of them.
# sr ratios 4-2-1 on the full map, 2-1-1 on the packed one: 4x4 keys in stages 1 and 2 either way.
DEMO = dict(img_size=32, patch_sizes=(2, 2, 2), embed_dims=(32, 64, 128), depths=(2, 2, 2), num_heads=(1, 2, 4),
            mlp_ratios=(8, 8, 4))
TEST = dict(img_size=32, patch_sizes=(2, 2, 2), embed_dims=(16, 32, 64), depths=(1, 2, 1), num_heads=(1, 2, 4),
            mlp_ratios=(2, 2, 2))


def pvt_test(**kwargs):
    """A tiny PVT for unit tests: 32 px, three stages of width 16/32/64, sr ratios 4-2-1."""
    return _make(PyramidVisionTransformer, dict(**TEST, sr_ratios=(4, 2, 1), num_classes=10), kwargs)


def pvt_demo(**kwargs):
    """The demo-data PVT (fine-tuning the demo UM-MAE): 32 px, widths 32/64/128, sr ratios 4-2-1."""
    return _make(PyramidVisionTransformer, dict(**DEMO, sr_ratios=(4, 2, 1), num_classes=10), kwargs)


def pvt_small(**kwargs):
    """PVT-S, sr ratios 8-4-2-1: 24.1M parameters with a 1000-class head (PVT's 24.5M less its learned position
    tables and cls token)."""
    return _make(PyramidVisionTransformer, dict(**SMALL, sr_ratios=(8, 4, 2, 1)), kwargs)


def mae_pvt_test(**kwargs):
    """A tiny UM-MAE PVT for unit tests: pvt_test's encoder with sr ratios 2-1-1 on the packed map, decoder 16-d."""
    return _make(MaskedAutoencoderPVT, dict(**TEST, sr_ratios=(2, 1, 1), decoder_embed_dim=16, decoder_depth=1,
                                            decoder_num_heads=2), kwargs)


def mae_pvt_demo(**kwargs):
    """The demo UM-MAE PVT: pvt_demo's encoder with sr ratios 2-1-1 on the packed map; decoder 64-d, 2 blocks."""
    return _make(MaskedAutoencoderPVT, dict(**DEMO, sr_ratios=(2, 1, 1), decoder_embed_dim=64, decoder_depth=2,
                                            decoder_num_heads=4), kwargs)


def mae_pvt_small(**kwargs):
    """UM-MAE PVT-S: 256 px, 16-px units, sr ratios 4-2-1-1 on the packed map; decoder 512-d, 2 blocks, 16 heads."""
    return _make(MaskedAutoencoderPVT, dict(**SMALL), kwargs)


MODELS = {f.__name__: f for f in (pvt_test, pvt_demo, pvt_small, mae_pvt_test, mae_pvt_demo, mae_pvt_small)}
ALIASES = {'pvt_s': 'pvt_small', 'mae_pvt_s': 'mae_pvt_small'}


def has_model(name):
    """True when `name` (or its alias) is a factory of this file."""
    return ALIASES.get(name, name) in MODELS


def create_model(name, **kwargs):
    """Build a PVT / UM-MAE PVT by factory name (or short alias); unknown names raise with the list of valid ones."""
    return lookup(name, MODELS, ALIASES)(**kwargs)
