"""The one loader for pre-trained weights, used by fine-tuning, linear probe, k-NN, distillation teachers and the
transfer folders. It accepts every released layout of MAE, MAE-Lite, TinyMIM, MAE-priv, UM-MAE, MoCo-v3 and timm.

References: MAE (util/pos_embed.interpolate_pos_embed, main_finetune key handling), MAE-Lite and TinyMIM checkpoint
layouts as described in SPEC §5.
"""
import logging
import math
import re

import torch
from timm.layers import trunc_normal_

import models_vit
from util.checkpoint import load_file
from util.pos_embed import interpolate_pos_embed

log = logging.getLogger(__name__)

WRAPPERS = ('model', 'module', 'state_dict', 'model_state')
PREFIXES = ('module.', 'model.', 'base_encoder.', 'encoder.', 'backbone.')
# top-level names that belong to pre-training only (teachers, adapters, momentum/EMA copies, decoders, mask tokens)
DROP = re.compile(r'^(teacher|\w*adapters?|distill|momentum\w*|predictor|projector|ema|model_ema|'
                  r'decoder|decoder_\w+|mask_token|vis_mask_token|target_encoder)(\.|$)')
# missing keys that a fresh initialisation is right for; anything else missing is an error
OPTIONAL = re.compile(r'^(head\.|head_dist\.|fc_norm\.|blocks\.\d+\.attn\.relative_position_(bias_table|index)|'
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
    notes += fit_dist_token(sd, model)
    resized = fit_rel_pos_tables(sd, model)
    if resized:
        notes.append(f'bicubic-resized {len(resized)} relative position tables to the window size (e.g. {resized[0]})')
    converted = fit_sr_convs(sd, model)
    if converted:
        notes.append(f'fitted {len(converted)} PVT spatial-reduction convs to the sr ratios (e.g. {converted[0]})')
    target = model.state_dict()
    if 'pos_embed' in sd and 'pos_embed' in target and hasattr(model, 'tokens_spatial_shape'):  # Hiera: no cls row
        sd['pos_embed'] = interpolate_pos_embed(sd['pos_embed'], model.tokens_spatial_shape, 0)
    elif 'pos_embed' in sd and 'pos_embed' in target:
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


def fit_sr_convs(sd, model):
    """PVT pre-trained by UM-MAE on the packed quarter-size map (sr ratios 4-2-1-1 for PVT-S) and fine-tuned on the
    full map (8-4-2-1), in place. Either way a key summarises the same image area (a 2x2 block of units), now seen
    at twice the resolution. A stored k x k conv `attn.sr` becomes fk x fk by nearest-upsampling its kernel and
    dividing by f², so a map that is constant on f x f patches (the packed map, upsampled) gives the same keys as
    before; a stage that had no reduction (sr 1) gets an sr conv that averages f x f tokens and a LayerNorm at
    (1, 0). Returns the converted keys."""
    target = model.state_dict()
    converted = []
    for key in [k for k in target if k.endswith('.attn.sr.weight')]:
        base, new = key[:-len('sr.weight')], target[key]  # new [C, C, fk, fk]
        if key in sd:
            old = sd[key]  # [C, C, k, k]
            f = new.shape[-1] // old.shape[-1]
            if old.shape == new.shape or old.shape[:2] != new.shape[:2] or f * old.shape[-1] != new.shape[-1]:
                continue
            sd[key] = old.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3) / f ** 2  # [C, C, fk, fk]
        elif base + 'q.weight' in sd:  # the stage ran without reduction: average pooling, channel by channel
            C, f, ref = new.shape[0], new.shape[-1], sd[base + 'q.weight']
            eye = torch.eye(C, dtype=ref.dtype).view(C, C, 1, 1)
            sd[key] = eye.expand(C, C, f, f) / f ** 2  # [C, C, f, f]
            sd[base + 'sr.bias'] = torch.zeros(C, dtype=ref.dtype)
            sd[base + 'norm.weight'] = torch.ones(C, dtype=ref.dtype)
            sd[base + 'norm.bias'] = torch.zeros(C, dtype=ref.dtype)
        else:
            continue
        converted.append(key)
    return converted


def fit_dist_token(sd, model):
    """DeiT distillation token, in place: a distilled model loading a checkpoint without one starts its dist token
    from the cls token (its position row is copied from cls in `fit_pos_embed`); a plain model loading a distilled
    checkpoint drops `dist_token` and `head_dist.*`. Returns notes."""
    target = model.state_dict()
    if 'dist_token' in target and 'dist_token' not in sd and 'cls_token' in sd:
        sd['dist_token'] = sd['cls_token'].clone()
        return ['no dist_token in the checkpoint: initialised from cls_token (and its position row from cls)']
    if 'dist_token' in sd and 'dist_token' not in target:
        for k in [k for k in sd if k == 'dist_token' or k.startswith('head_dist.')]:
            del sd[k]
        return ['dropped the distillation token and head_dist (the model has none)']
    return []


def fit_pos_embed(pos, target, model):
    """Give the stored embedding the model's prefix rows (none, cls, or cls + DeiT dist token), then interpolate the
    grid to the model's. A missing cls row is zero (as MAE's), a missing dist row a copy of the cls row; surplus
    prefix rows are dropped."""
    num_prefix = target.shape[1] - model.patch_embed.num_patches
    stored_prefix = pos.shape[1] - math.isqrt(pos.shape[1]) ** 2  # the grid is square; squares >= 4 lie 5+ apart
    prefix, grid = pos[:, :stored_prefix], pos[:, stored_prefix:]  # [1, P, D], [1, h*w, D]
    if num_prefix and not stored_prefix:
        prefix = torch.zeros_like(pos[:, :1])
    while prefix.shape[1] < num_prefix:
        prefix = torch.cat([prefix, prefix[:, :1]], dim=1)
    return interpolate_pos_embed(torch.cat([prefix[:, :num_prefix], grid], dim=1), model.patch_embed.grid_size,
                                 num_prefix)


def block_heads_of(raw):
    """The per-block head counts a checkpoint was trained with ([(block, heads), ...] from its args: TinyMIM's
    export, or a fine-tune of one), or []."""
    args = raw.get('args') if isinstance(raw, dict) else None
    return [tuple(p) for p in args.get('block_heads') or []] if isinstance(args, dict) else []


def apply_block_heads(model, raw):
    """Rebuild `model`'s blocks whose head count the checkpoint `raw` says differs (a ViT with `blocks` of
    models_vit Attention); returns the (block, heads) pairs changed."""
    heads = block_heads_of(raw)
    if not heads or not hasattr(model, 'blocks'):
        return []
    return models_vit.set_block_heads(model, heads)


def load_pretrained(model, path_or_state, head_init_std=2e-5, keep_decoder=False):
    """Load pre-trained weights of any supported layout into `model` (a ViT/MAE of this repo).

    The head is dropped when its shape differs and re-initialised (trunc-normal `head_init_std`, bias 0); the
    report of missing / unexpected / shape-mismatched keys is logged. Raises KeyError naming the keys when an
    essential weight (anything but head, fc_norm, relative-position tables, LayerScale) is missing or stored with
    another shape (with both shapes, and the --in_chans to use when the patch embedding's input channels differ).
    Returns: dict(missing=[...], unexpected=[...], mismatched=[...], notes=[...], source=state dict as stored).
    """
    name = path_or_state if isinstance(path_or_state, str) else '<state dict>'
    raw = load_file(path_or_state) if isinstance(path_or_state, str) else path_or_state
    changed = apply_block_heads(model, raw)
    sd, notes = prepare_state_dict(unwrap_state_dict(raw), model, keep_decoder)
    notes += [f'block {i} rebuilt with {h} heads, as pre-trained' for i, h in changed]
    target = model.state_dict()
    mismatched = [k for k in sd if k in target and sd[k].shape != target[k].shape]
    shapes = {k: (tuple(sd[k].shape), tuple(target[k].shape)) for k in mismatched}
    for k in mismatched:
        notes.append(f'{k}: shape {tuple(sd[k].shape)} in the checkpoint, {tuple(target[k].shape)} in the model; '
                     'not loaded')
        del sd[k]
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith('relative_position_index')]
    essential = [k for k in missing if not OPTIONAL.match(k)]
    wrong_shape = [k for k in essential if k in shapes]  # stored, but for another architecture
    if wrong_shape:  # never a silent fresh start for an essential weight (e.g. the patch embedding)
        detail = '; '.join(f'{k}: {shapes[k][0]} in the checkpoint, {shapes[k][1]} in the model'
                           for k in wrong_shape[:4])
        proj = shapes.get('patch_embed.proj.weight')
        hint = ''
        if proj and len(proj[0]) == 4 and proj[0][1] != proj[1][1]:
            hint = (f' The checkpoint takes {proj[0][1]}-channel inputs and the model {proj[1][1]}: build the model '
                    f'with --in_chans {proj[0][1]}, or use a checkpoint pre-trained with --in_chans {proj[1][1]}.')
        raise KeyError(f'{name}: essential weights of the wrong shape: {detail}.{hint}')
    if essential:
        raise KeyError(f'{name}: essential weights missing from the checkpoint: {essential[:8]}'
                       f'{" ..." if len(essential) > 8 else ""} ({len(essential)} in all). Is it for this model?')
    head = model.get_classifier() if hasattr(model, 'get_classifier') else getattr(model, 'head', None)  # Swin: head.fc
    if isinstance(head, torch.nn.Linear) and any(k in missing for k in ('head.weight', 'head.fc.weight')):
        trunc_normal_(head.weight, std=head_init_std)
        torch.nn.init.zeros_(head.bias)
    head_dist = getattr(model, 'head_dist', None)  # DeiT's distillation head
    if isinstance(head_dist, torch.nn.Linear) and 'head_dist.weight' in missing:
        trunc_normal_(head_dist.weight, std=head_init_std)
        torch.nn.init.zeros_(head_dist.bias)
    for line in notes:
        log.info(f'{name}: {line}')
    log.info(f'{name}: loaded {len(sd) - len(result.unexpected_keys)} tensors; missing {missing}; '
             f'unexpected {result.unexpected_keys}')
    return dict(missing=missing, unexpected=list(result.unexpected_keys), mismatched=mismatched, notes=notes,
                source=raw)
