"""Layer-wise learning-rate decay: optimizer parameter groups whose lr shrinks geometrically towards the input.

References: BEiT (Bao et al., ICLR 2022) and MAE (util/lr_decay.py) — layer ids and `lr_scale`;
MAE-Lite (decay 0.85 for Tiny fine-tuning, 0.75 for transfer; stage-aware ids for Swin, whose norm/head decay² we
do not copy; the same rule for PVT). `util.lr_sched.adjust_learning_rate` multiplies each group's lr by its `lr_scale`.
"""
import functools
import re

from util.optim import no_weight_decay_names


def layer_id_vit(name, num_layers):
    """ViT layer id of a parameter: cls_token / pos_embed / patch_embed -> 0; blocks.i -> i + 1; everything else
    (norm, fc_norm, head) -> num_layers (= depth + 1, lr scale 1)."""
    if name in ('cls_token', 'pos_embed', 'mask_token', 'dist_token') or name.startswith('patch_embed.'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return num_layers


def layer_id_swin(name, num_layers, depths):
    """Stage-aware Swin layer id (SPEC §1.3): patch_embed and mask tokens -> 0; block b of stage s ->
    sum(depths[:s]) + b + 1; patch merging -> the id of the last block before it; norm / fc_norm / head ->
    num_layers (= sum(depths) + 1, lr scale 1). In timm's layout `layers.s.downsample` opens stage s: it is the
    original Swin's downsample that closes stage s-1, whose id is sum(depths[:s])."""
    if name in ('mask_token', 'vis_mask_token') or name.startswith('patch_embed.'):
        return 0
    m = re.match(r'layers\.(\d+)\.(?:blocks\.(\d+)|downsample)\.', name)
    if m is None:
        return num_layers
    stage = int(m.group(1))
    if m.group(2) is None:
        return sum(depths[:stage])
    return sum(depths[:stage]) + int(m.group(2)) + 1


def layer_id_pvt(name, num_layers, depths):
    """Stage-aware PVT layer id, Swin's rule on PVT's names: patch_embed1 -> 0; block{s}.{b} as Swin's block b of
    stage s-1; patch_embed{s} (s > 1), which downsamples into stage s, as Swin's downsample of stage s-1."""
    name = re.sub(r'^patch_embed1\.', 'patch_embed.', name)
    name = re.sub(r'^patch_embed(\d+)\.', lambda m: f'layers.{int(m.group(1)) - 1}.downsample.', name)
    name = re.sub(r'^block(\d+)\.(\d+)\.', lambda m: f'layers.{int(m.group(1)) - 1}.blocks.{m.group(2)}.', name)
    return layer_id_swin(name, num_layers, depths)


def no_weight_decay(name, param, skip):
    """True for 1-D parameters (norms, q/v biases), biases, and names listed in `skip` (exact, or as the last
    components of the name, e.g. 'relative_position_bias_table')."""
    return param.ndim <= 1 or name.endswith('.bias') or name in skip or any(name.endswith('.' + s) for s in skip)


def param_groups_lrd(model, weight_decay=0.05, layer_decay=0.75, no_weight_decay_list=None, layer_id_fn=None,
                     num_layers=None):
    """Parameter groups for layer-wise lr decay.

    Args:
        model: the unwrapped module; parameters with requires_grad=False are left out.
        weight_decay: for the decayed group of each layer (the other gets 0).
        layer_decay: d; a parameter of layer id i gets `lr_scale = d ** (num_layers - i)`.
        no_weight_decay_list: names without weight decay (default: `model.no_weight_decay()`).
        layer_id_fn(name, num_layers) -> int: layer id of a parameter (default `layer_id_vit`, or `layer_id_swin`
            for a model with stage `depths`, i.e. a models_swin Swin; `layer_id_pvt` for a models_pvt PVT).
        num_layers: the id of the last layer (scale 1); default `len(model.blocks) + 1` (`sum(depths) + 1` for Swin).
    Returns: a list of dicts {'params', 'weight_decay', 'lr_scale', 'layer_id'}, at most two per layer id, every
        trainable parameter in exactly one.
    """
    skip = set(no_weight_decay_names(model) if no_weight_decay_list is None else no_weight_decay_list)
    depths = getattr(model, 'depths', None)  # a Swin: stage-aware ids
    if layer_id_fn is None:
        stage_ids = layer_id_pvt if hasattr(model, 'sr_ratios') else layer_id_swin  # a models_pvt PVT
        layer_id_fn = layer_id_vit if depths is None else functools.partial(stage_ids, depths=depths)
    if num_layers is None:
        num_layers = len(model.blocks) + 1 if depths is None else sum(depths) + 1
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p, skip)
        layer_id = layer_id_fn(name, num_layers)
        key = (layer_id, decay)
        if key not in groups:
            groups[key] = {'params': [], 'weight_decay': weight_decay if decay else 0.0,
                           'lr_scale': layer_decay ** (num_layers - layer_id), 'layer_id': layer_id}
        groups[key]['params'].append(p)
    return [groups[k] for k in sorted(groups)]
