"""Layer-wise learning-rate decay: optimizer parameter groups whose lr shrinks geometrically towards the input.

References: BEiT (Bao et al., ICLR 2022) and MAE (util/lr_decay.py) — layer ids and `lr_scale`;
MAE-Lite (decay 0.85 for Tiny fine-tuning, 0.75 for transfer). `util.lr_sched.adjust_learning_rate` multiplies each
group's lr by its `lr_scale`.
"""
from util.optim import no_weight_decay_names


def layer_id_vit(name, num_layers):
    """ViT layer id of a parameter: cls_token / pos_embed / patch_embed -> 0; blocks.i -> i + 1; everything else
    (norm, fc_norm, head) -> num_layers (= depth + 1, lr scale 1)."""
    if name in ('cls_token', 'pos_embed', 'mask_token', 'dist_token') or name.startswith('patch_embed.'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return num_layers


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
        layer_id_fn(name, num_layers) -> int: layer id of a parameter (default `layer_id_vit`; Swin passes its
            stage-aware one).
        num_layers: the id of the last layer (scale 1); default `len(model.blocks) + 1`.
    Returns: a list of dicts {'params', 'weight_decay', 'lr_scale', 'layer_id'}, at most two per layer id, every
        trainable parameter in exactly one.
    """
    skip = set(no_weight_decay_names(model) if no_weight_decay_list is None else no_weight_decay_list)
    layer_id_fn = layer_id_fn or layer_id_vit
    if num_layers is None:
        num_layers = len(model.blocks) + 1
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
