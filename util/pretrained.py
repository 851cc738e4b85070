"""The one loader for pre-trained weights, used by fine-tuning, linear probe, k-NN, distillation teachers and the
transfer folders. It accepts every released layout of MAE, MAE-Lite, TinyMIM, MAE-priv, UM-MAE, MoCo-v3 and timm.

References: MAE (util/pos_embed.interpolate_pos_embed, main_finetune key handling), MAE-Lite and TinyMIM checkpoint
layouts as described in SPEC §5.
"""
import logging
import re

import torch
from timm.layers import trunc_normal_

from util.checkpoint import load_file
from util.pos_embed import interpolate_pos_embed

log = logging.getLogger(__name__)

WRAPPERS = ('model', 'module', 'state_dict', 'model_state')
PREFIXES = ('module.', 'model.', 'base_encoder.', 'encoder.', 'backbone.')
# top-level names that belong to pre-training only (teachers, adapters, momentum/EMA copies, decoders, mask tokens)
DROP = re.compile(r'^(teacher|\w*adapters?|distill|momentum|momentum_encoder|predictor|projector|ema|model_ema|'
                  r'decoder|decoder_\w+|mask_token|vis_mask_token|target_encoder)(\.|$)')
# missing keys that a fresh initialisation is right for; anything else missing is an error
OPTIONAL = re.compile(r'^(head\.|fc_norm\.|blocks\.\d+\.attn\.relative_position_(bias_table|index)|'
                      r'blocks\.\d+\.ls\d\.gamma)')


def unwrap_state_dict(obj):
    """Peel `model`/`module`/`state_dict`/`model_state` wrappers until a flat {name: tensor} dict remains."""
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        key = next((k for k in WRAPPERS if k in obj), None)
        if key is None:
            raise ValueError(f'no weights found: top-level keys are {sorted(obj)[:10]}')
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f'expected a state dict, got {type(obj).__name__}')
    return obj


def strip_prefixes(sd):
    """Remove wrapper prefixes (`module.`, then `model.`, `base_encoder.`, `encoder.`, `backbone.`), in that order,
    from the keys that carry them."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return sd


def convert_keys(sd, model):
    """Rename to this repo's (timm's) names: LayerScale gamma_1/2 -> ls1/ls2.gamma; q/v bias <-> fused qkv bias."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r'\.gamma_([12])$', r'.ls\1.gamma', k)
        out[k] = v
    target = model.state_dict()
    for key in [k for k in out if k.endswith('attn.q_bias')]:
        base = key[:-len('q_bias')]
        if base + 'qkv.bias' in target:  # separate q/v biases -> one qkv bias with k bias 0
            q, v = out.pop(key), out.pop(base + 'v_bias')
            out[base + 'qkv.bias'] = torch.cat([q, torch.zeros_like(q), v])
    for key in [k for k in out if k.endswith('attn.qkv.bias')]:
        base = key[:-len('qkv.bias')]
        if base + 'q_bias' in target and key not in target:  # fused -> separate; the k bias cannot change softmax
            b = out.pop(key)
            d = b.shape[0] // 3
            out[base + 'q_bias'], out[base + 'v_bias'] = b[:d], b[2 * d:]
    return out


def prepare_state_dict(sd, model, keep_decoder=False):
    """Everything SPEC §5 asks, short of loading: returns (state dict for `model`, notes on what was dropped)."""
    notes = []
    sd = strip_prefixes(sd)
    if not keep_decoder:
        dropped = [k for k in sd if DROP.match(k)]
        if dropped:
            notes.append(f'dropped {len(dropped)} pre-training-only keys (e.g. {dropped[0]})')
        sd = {k: v for k, v in sd.items() if not DROP.match(k)}
    depth = len(getattr(model, 'blocks', []))
    extra = [k for k in sd if re.match(r'^blocks\.(\d+)\.', k) and int(k.split('.')[1]) >= depth]
    if extra:
        notes.append(f'dropped {len(extra)} keys of blocks beyond depth {depth} (e.g. {extra[0]})')
        sd = {k: v for k, v in sd.items() if k not in set(extra)}
    sd = convert_keys(sd, model)
    resized = fit_rel_pos_tables(sd, model)
    if resized:
        notes.append(f'bicubic-resized {len(resized)} relative position tables to the window size (e.g. {resized[0]})')
    target = model.state_dict()
    if 'pos_embed' in sd and 'pos_embed' in target:
        sd['pos_embed'] = fit_pos_embed(sd['pos_embed'], target['pos_embed'], model)
    if 'fc_norm.weight' in target and 'fc_norm.weight' not in sd and 'norm.weight' not in target:
        # global-average pooling: the pre-training `norm` is not used; `fc_norm` starts fresh (official MAE)
        sd = {k: v for k, v in sd.items() if not k.startswith('norm.')}
        notes.append('global_pool=avg: dropped norm.*, fc_norm starts at (1, 0)')
    return sd, notes


def fit_rel_pos_tables(sd, model):
    """Swin with another window size (e.g. SimMIM's 6 -> 7, UM-MAE's 8 -> 16): bicubic-resize each stored
    [(2w-1)², H] `relative_position_bias_table` to the model's [(2w'-1)², H], in place. Returns the resized keys.
    (UM-MAE's position MLP needs nothing: it is defined for any offset.)"""
    target = model.state_dict()
    resized = []
    for k in [k for k in sd if k.endswith('relative_position_bias_table') and k in target]:
        old, new = sd[k], target[k]
        if old.shape == new.shape or old.shape[1] != new.shape[1]:
            continue
        a, b = int(round(old.shape[0] ** 0.5)), int(round(new.shape[0] ** 0.5))
        if a * a != old.shape[0] or b * b != new.shape[0] or k.startswith('blocks.'):
            continue  # not a square Swin table (the ViT's BEiT tables carry 3 extra cls rows)
        grid = old.t().reshape(1, -1, a, a).float()  # [1, H, 2w-1, 2w-1]
        grid = torch.nn.functional.interpolate(grid, size=(b, b), mode='bicubic', align_corners=False)
        sd[k] = grid.reshape(-1, b * b).t().to(old.dtype)  # [(2w'-1)², H]
        resized.append(k)
    return resized


def fit_pos_embed(pos, target, model):
    """Add a zero cls row when the stored embedding has none, then interpolate the grid to the model's."""
    num_prefix = target.shape[1] - model.patch_embed.num_patches
    stored_grid = pos.shape[1]
    if int(round(stored_grid ** 0.5)) ** 2 != stored_grid:  # has a cls row
        stored_grid -= 1
        has_prefix = True
    else:
        has_prefix = False
    if num_prefix and not has_prefix:
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    elif has_prefix and not num_prefix:
        pos = pos[:, 1:]
    return interpolate_pos_embed(pos, model.patch_embed.grid_size, num_prefix)


def load_pretrained(model, path_or_state, head_init_std=2e-5, keep_decoder=False):
    """Load pre-trained weights of any supported layout into `model` (a ViT/MAE of this repo).

    The head is dropped when its shape differs and re-initialised (trunc-normal `head_init_std`, bias 0); the
    report of missing / unexpected / shape-mismatched keys is logged. Raises KeyError naming the keys when an
    essential weight (anything but head, fc_norm, relative-position tables, LayerScale) is missing.
    Returns: dict(missing=[...], unexpected=[...], mismatched=[...], notes=[...], source=state dict as stored).
    """
    name = path_or_state if isinstance(path_or_state, str) else '<state dict>'
    raw = load_file(path_or_state) if isinstance(path_or_state, str) else path_or_state
    sd, notes = prepare_state_dict(unwrap_state_dict(raw), model, keep_decoder)
    target = model.state_dict()
    mismatched = [k for k in sd if k in target and sd[k].shape != target[k].shape]
    for k in mismatched:
        notes.append(f'{k}: shape {tuple(sd[k].shape)} in the checkpoint, {tuple(target[k].shape)} in the model; '
                     'not loaded')
        del sd[k]
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith('relative_position_index')]
    essential = [k for k in missing if not OPTIONAL.match(k)]
    if essential:
        raise KeyError(f'{name}: essential weights missing from the checkpoint: {essential[:8]}'
                       f'{" ..." if len(essential) > 8 else ""} ({len(essential)} in all). Is it for this model?')
    head = model.get_classifier() if hasattr(model, 'get_classifier') else getattr(model, 'head', None)  # Swin: head.fc
    if isinstance(head, torch.nn.Linear) and any(k in missing for k in ('head.weight', 'head.fc.weight')):
        trunc_normal_(head.weight, std=head_init_std)
        torch.nn.init.zeros_(head.bias)
    for line in notes:
        log.info(f'{name}: {line}')
    log.info(f'{name}: loaded {len(sd) - len(result.unexpected_keys)} tensors; missing {missing}; '
             f'unexpected {result.unexpected_keys}')
    return dict(missing=missing, unexpected=list(result.unexpected_keys), mismatched=mismatched, notes=notes,
                source=raw)
