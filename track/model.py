"""One-stream ViT tracker with candidate elimination and a center head (OSTrack), built from models_vit.py blocks.

References:
  OSTrack  - Ye et al., "Joint Feature Learning and Relation Modeling for Tracking: A One-Stream Framework",
             ECCV 2022 (joint template/search encoding, candidate elimination, center head, keep-ratio warm-up).
  CenterNet - Zhou et al., "Objects as Points", 2019 (Gaussian heat-map targets, penalty-reduced focal loss).
  GIoU     - Rezatofighi et al., CVPR 2019.
  MAE-Lite - Wang et al., ICML 2023 (tracking transfer of lightweight pre-trained ViTs, SPEC §6.3).
Shapes: N batch, Lz/Lx template/search tokens, D width, H heads. Boxes: normalised [cx, cy, w, h] in the search
crop unless said.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import models_vit
from util.checkpoint import load_file
from util.pos_embed import interpolate_pos_embed
from util.pretrained import load_pretrained, strip_prefixes, unwrap_state_dict


def conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CenterHead(nn.Module):
    """OSTrack's center head: three conv stacks (C, C/2, C/4, C/8 channels, then a 1x1 conv) on the search feature
    map giving a centre score map (sigmoid), a sub-cell offset and a normalised box size (sigmoid)."""

    def __init__(self, in_dim, channels=256):
        super().__init__()

        def branch(out):
            c = channels
            return nn.Sequential(conv_bn_relu(in_dim, c), conv_bn_relu(c, c // 2), conv_bn_relu(c // 2, c // 4),
                                 conv_bn_relu(c // 4, c // 8), nn.Conv2d(c // 8, out, 1))

        self.ctr, self.offset, self.size = branch(1), branch(2), branch(2)
        # CenterNet's prior: start every cell at score 0.1 rather than 0.5, so the focal loss of the many negative
        # cells does not swamp the first steps
        nn.init.constant_(self.ctr[-1].bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, x):
        """x [N, D, h, w] -> score [N, 1, h, w] in (0, 1), offset [N, 2, h, w], size [N, 2, h, w] in (0, 1)."""
        # the clamp keeps log(score) and log(1 - score) of the focal loss finite
        score = self.ctr(x).sigmoid().clamp(1e-4, 1 - 1e-4)
        return score, self.offset(x), self.size(x).sigmoid()


def decode_boxes(score, offset, size):
    """Box at the arg-max of each score map: centre = (cell + offset) / grid, size as predicted.
    Args: score [N, 1, h, w], offset/size [N, 2, h, w]. Returns [N, 4] normalised cxcywh."""
    N, _, h, w = score.shape
    idx = score.flatten(1).argmax(dim=1)  # [N]
    gather = idx.view(N, 1, 1).expand(N, 2, 1)
    off = offset.flatten(2).gather(2, gather).squeeze(2)  # [N, 2]
    wh = size.flatten(2).gather(2, gather).squeeze(2)  # [N, 2]
    cx = ((idx % w).to(off.dtype) + off[:, 0]) / w
    cy = (torch.div(idx, w, rounding_mode='floor').to(off.dtype) + off[:, 1]) / h
    return torch.stack([cx, cy, wh[:, 0], wh[:, 1]], dim=1)


def centre_tokens(grid):
    """Indices of the template's centre token(s) in its raster order: the middle one of an odd grid, the middle 2x2
    of an even grid (OSTrack's "template centre" used to rank search tokens)."""
    h, w = grid
    rows = [h // 2] if h % 2 else [h // 2 - 1, h // 2]
    cols = [w // 2] if w % 2 else [w // 2 - 1, w // 2]
    return [r * w + c for r in rows for c in cols]


def eliminate_candidates(tokens, logits, keep_index, len_t, centre, keep_ratio):
    """Candidate elimination: keep the ceil(keep_ratio * Ls) search tokens the template centre attends to most.

    Args:
        tokens: [N, Lt + Ls, D] template then search tokens; logits: [N, H, L, L] the block's pre-softmax attention;
        keep_index: [N, Ls] position of each present search token in the full search grid; len_t: Lt;
        centre: template token indices whose attention ranks the search tokens (averaged over them and the heads).
    Returns: tokens [N, Lt + K, D], keep_index [N, K], K = ceil(keep_ratio * Ls) (unchanged when K >= Ls).
    """
    Ls = tokens.shape[1] - len_t
    K = math.ceil(keep_ratio * Ls)
    if K >= Ls:
        return tokens, keep_index
    attn = logits[:, :, centre].softmax(dim=-1)[..., len_t:]  # [N, H, C, Ls]: centre -> search attention
    order = attn.mean(dim=(1, 2)).topk(K, dim=1).indices  # [N, K], most attended first
    search = tokens[:, len_t:].gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # [N, K, D]
    return torch.cat([tokens[:, :len_t], search], dim=1), keep_index.gather(1, order)


def keep_ratio_at(epoch, target, start_epoch, warm_epochs):
    """OSTrack's keep-ratio schedule: 1 before `start_epoch`, then a half-cosine from 1 down to `target` over
    `warm_epochs` epochs, `target` afterwards (OSTrack ViT-B: start 20, warm 80, target 0.7)."""
    if epoch < start_epoch:
        return 1.0
    if warm_epochs <= 0 or epoch >= start_epoch + warm_epochs:
        return target
    t = (epoch - start_epoch) / warm_epochs
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * t))


class OSTrack(nn.Module):
    """Template and search region patch-embedded with their own position embeddings (interpolated from the
    pre-trained grid), concatenated and run jointly through the ViT blocks; candidate elimination after the blocks in
    `ce_layers`; the search tokens, put back on the full grid (eliminated positions zero), feed the center head.

    Built around an existing `models_vit.VisionTransformer` (usually with pre-trained weights already loaded): its
    patch_embed, blocks and norm are reused; cls token and classifier head are not used (OSTrack default).
    Elimination happens after a whole block (attention + MLP) rather than between its attention and MLP as in
    OSTrack's CE block, so the models_vit Block is reused unchanged.
    """

    def __init__(self, vit, template_size=128, search_size=256, ce_layers=(3, 6, 9), ce_keep_ratio=0.7,
                 head_channels=256):
        super().__init__()
        if not isinstance(vit.norm, nn.LayerNorm):
            raise ValueError("the tracker needs the ViT's final `norm`: build it with global_pool='token'")
        p = vit.patch_embed.patch_size[0]
        if template_size % p or search_size % p:
            raise ValueError(f'template ({template_size}) and search ({search_size}) sizes must be multiples of '
                             f'the patch size {p}')
        self.patch_size, self.embed_dim = p, vit.embed_dim
        self.template_size, self.search_size = template_size, search_size
        self.grid_z, self.grid_x = (template_size // p,) * 2, (search_size // p,) * 2
        self.patch_embed, self.blocks, self.norm = vit.patch_embed, vit.blocks, vit.norm
        pos = vit.pos_embed.detach()[:, 1:]  # [1, h*w, D] without the cls row
        self.pos_embed_z = nn.Parameter(interpolate_pos_embed(pos, self.grid_z, num_prefix=0).clone())
        self.pos_embed_x = nn.Parameter(interpolate_pos_embed(pos, self.grid_x, num_prefix=0).clone())
        self.ce_layers = tuple(ce_layers)
        self.ce_keep_ratio = ce_keep_ratio
        self.centre = centre_tokens(self.grid_z)
        self.box_head = CenterHead(vit.embed_dim, head_channels)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed_z', 'pos_embed_x'}

    def backbone_parameters(self):
        """Names of the ViT's parameters (they train with the backbone lr multiplier)."""
        return [n for n, _ in self.named_parameters() if not n.startswith('box_head.')]

    def forward(self, template, search, keep_ratio=None):
        """template [N, 3, Hz, Wz], search [N, 3, Hx, Wx]; keep_ratio overrides `ce_keep_ratio` (1 = no elimination).

        Returns dict: boxes [N, 4] (normalised cxcywh in the search crop), score_map [N, 1, h, w], offset_map and
        size_map [N, 2, h, w], keep_index [N, K] (search positions still present after the last elimination)."""
        keep_ratio = self.ce_keep_ratio if keep_ratio is None else keep_ratio
        z = self.patch_embed(template) + self.pos_embed_z  # [N, Lz, D]
        x = self.patch_embed(search) + self.pos_embed_x  # [N, Lx, D]
        N, Lz, D = z.shape
        Lx = x.shape[1]
        tokens = torch.cat([z, x], dim=1)  # [N, Lz + Lx, D]
        keep_index = torch.arange(Lx, device=x.device).expand(N, Lx)  # [N, Lx]
        for i, blk in enumerate(self.blocks):
            ce = i in self.ce_layers and keep_ratio < 1
            extras = {} if ce else None  # asking for the logits takes the explicit attention path: CE layers only
            tokens = blk(tokens, extras)
            if ce:
                tokens, keep_index = eliminate_candidates(tokens, extras['logits'], keep_index, Lz, self.centre,
                                                          keep_ratio)
        tokens = self.norm(tokens)
        kept = tokens[:, Lz:]  # [N, K, D]
        full = kept.new_zeros(N, Lx, D).scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, D), kept)  # [N, Lx, D]
        feat = full.transpose(1, 2).reshape(N, D, *self.grid_x)  # [N, D, h, w]
        score, offset, size = self.box_head(feat)
        return dict(boxes=decode_boxes(score, offset, size), score_map=score, offset_map=offset, size_map=size,
                    keep_index=keep_index)


# ---------------------------------------------------------------------------------------------------------------
# losses

def box_cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def giou(a, b):
    """Generalised IoU of matching xyxy boxes [N, 4] -> (giou [N], iou [N])."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    inter = ((torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)).prod(dim=1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-7)
    hull = ((torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0)).prod(dim=1)
    return iou - (hull - union) / hull.clamp(min=1e-7), iou


def gaussian_radius(h, w, min_overlap=0.7):
    """CenterNet's radius: the largest centre shift (in cells) for which a box of h x w cells still reaches
    `min_overlap` IoU with the truth, the smallest over its three cases. Tensors [N] -> [N]."""
    b1, c1 = h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.min(torch.min(r1, r2), r3)


def gaussian_heatmap(boxes, grid):
    """Target heat-map: a Gaussian (sigma = (2r + 1) / 6, r = CenterNet radius) peaking at exactly 1 in the cell
    that holds each box centre. boxes [N, 4] normalised cxcywh -> [N, 1, h, w]."""
    h, w = grid
    cx = (boxes[:, 0] * w).clamp(0, w - 1e-3).floor()  # [N] centre cell
    cy = (boxes[:, 1] * h).clamp(0, h - 1e-3).floor()
    radius = gaussian_radius(boxes[:, 3] * h, boxes[:, 2] * w).clamp(min=0).floor()
    sigma = (2 * radius + 1) / 6  # [N]
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype).view(1, h, 1)
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype).view(1, 1, w)
    d2 = (xs - cx.view(-1, 1, 1)) ** 2 + (ys - cy.view(-1, 1, 1)) ** 2  # [N, h, w]
    return torch.exp(-d2 / (2 * sigma.view(-1, 1, 1) ** 2)).unsqueeze(1)


def focal_loss(pred, target):
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), summed and divided by the number of peaks.
    pred, target [N, 1, h, w] with pred in (0, 1) and target 1 exactly at the peaks."""
    pos = target.eq(1).float()
    pos_loss = torch.log(pred) * (1 - pred) ** 2 * pos
    neg_loss = torch.log(1 - pred) * pred ** 2 * (1 - target) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def tracking_loss(out, boxes, weights=(1.0, 2.0, 5.0)):
    """OSTrack's loss: focal on the heat-map + GIoU (x2) + L1 (x5) on the box decoded at the predicted peak.
    Args: out from OSTrack.forward; boxes [N, 4] normalised cxcywh. Returns (loss, metrics dict)."""
    w_focal, w_giou, w_l1 = weights
    score = out['score_map'].float()
    target_map = gaussian_heatmap(boxes.float(), score.shape[-2:])
    pred = box_cxcywh_to_xyxy(out['boxes'].float())
    gt = box_cxcywh_to_xyxy(boxes.float())
    g, iou = giou(pred, gt)
    l_focal, l_giou, l_l1 = focal_loss(score, target_map), (1 - g).mean(), F.l1_loss(pred, gt)
    loss = w_focal * l_focal + w_giou * l_giou + w_l1 * l_l1
    return loss, dict(focal=l_focal.detach(), giou=l_giou.detach(), l1=l_l1.detach(), iou=iou.detach().mean())


# ---------------------------------------------------------------------------------------------------------------
# building

def build_tracker(model='vit_tiny_patch16', pretrained='', template_size=128, search_size=256, ce_layers=(3, 6, 9),
                  ce_keep_ratio=0.7, head_channels=256, drop_path_rate=0.0, **vit_kwargs):
    """A ViT from models_vit (at its factory's image size, so the pre-trained position grid is kept as stored), with
    `pretrained` weights from any checkpoint util.pretrained.load_pretrained accepts, wrapped into an OSTrack.

    A fine-tuned global-pool checkpoint has `fc_norm` instead of `norm`; its fc_norm then serves as the final norm."""
    vit = models_vit.create_model(model, num_classes=0, global_pool='token', drop_path_rate=drop_path_rate,
                                  **vit_kwargs)
    if pretrained:
        sd = strip_prefixes(unwrap_state_dict(load_file(pretrained) if isinstance(pretrained, str) else pretrained))
        if 'norm.weight' not in sd and 'fc_norm.weight' in sd:
            sd = {(('norm.' + k[len('fc_norm.'):]) if k.startswith('fc_norm.') else k): v for k, v in sd.items()}
        load_pretrained(vit, sd)
    return OSTrack(vit, template_size, search_size, ce_layers, ce_keep_ratio, head_channels)


def ostrack_test(**kwargs):
    """A tiny tracker for unit tests: vit_test blocks (width 32, 2 blocks) with patch 4, template 16, search 32."""
    preset = dict(model='vit_test', patch_size=4, template_size=16, search_size=32, ce_layers=(0, 1),
                  ce_keep_ratio=0.7, head_channels=16)
    return build_tracker(**{**preset, **kwargs})
