"""The frozen encoder of the probes (linear probe, k-NN): built from any checkpoint layout, and its features.

References:
  MAE      - He et al., CVPR 2022 (linear probe on the cls token after the final norm; encoder frozen, eval mode).
  MAE-priv - linear probe / k-NN on globally averaged patch tokens.
  SimMIM   - Xie et al., CVPR 2022 (probing an intermediate block).
  mae#186  - the official probe with --global_pool feeds a randomly initialised, frozen fc_norm; avoided here.
"""
import logging

import torch

import models_pvt
import models_swin
import models_vit
from util.checkpoint import load_file
from util.pretrained import DROP, load_pretrained, strip_prefixes, unwrap_state_dict

log = logging.getLogger(__name__)
PYRAMIDS = (models_swin.SwinTransformer, models_pvt.PyramidVisionTransformer)  # GAP encoders without a cls token


def read_state_dict(path):
    """The flat, prefix-stripped {name: tensor} dict stored in a checkpoint file of any supported layout."""
    return strip_prefixes(unwrap_state_dict(load_file(path)))


def checkpoint_layout(sd):
    """What the weights were trained as, from their keys.

    Returns 'mae' (decoder / mask-token / teacher / momentum keys: an MAE-style pre-training checkpoint),
    'avg' (`fc_norm.*` and no `norm.*`: fine-tuned with global average pooling), 'token' (`head.*` and `norm.*`:
    fine-tuned on the cls token) or 'encoder' (encoder-only weights; the pre-training is unknown).
    None for no weights (random init)."""
    if not sd:
        return None
    keys = set(sd)
    if any(DROP.match(k) for k in keys):
        return 'mae'
    has_norm = any(k.startswith('norm.') for k in keys)
    if any(k.startswith('fc_norm.') for k in keys) and not has_norm:
        return 'avg'
    if has_norm and any(k.startswith('head.') for k in keys):
        return 'token'
    return 'encoder'


def check_feature(layout, feature, source=''):
    """Warn when `feature` ('token' | 'avg') is not how weights of `layout` were trained or officially probed."""
    src = f'{source}: ' if source else ''
    if layout is None:
        log.warning('no --finetune: the encoder is randomly initialised (a baseline, not a pre-trained model)')
    elif layout == 'mae' and feature == 'avg':
        log.warning(f'{src}pre-training checkpoint probed with --feature avg (MAE-priv); the official MAE probe '
                    'uses the cls token (--feature token), so numbers are not comparable with its paper')
    elif layout == 'avg' and feature == 'token':
        log.warning(f'{src}fine-tuned with global average pooling (fc_norm.*, no norm.*): its cls token was never '
                    'trained for classification and has no final norm; --feature avg matches it')
    elif layout == 'token' and feature == 'avg':
        log.warning(f'{src}fine-tuned on the cls token (norm.* and head.*); --feature token matches it')
    elif layout == 'encoder':
        log.info(f'{src}encoder-only weights; MAE-family encoders are officially probed on the cls token')


def build_frozen_encoder(name, img_size, state=None, layout=None, in_chans=3):
    """A models_vit ViT (or models_swin Swin) with no head, weights loaded from `state` (a state dict, via
    util.pretrained), every parameter frozen, in eval mode. With `layout == 'avg'` the encoder keeps the
    checkpoint's trained `fc_norm` (and has no `norm`); otherwise it has the final `norm` and no `fc_norm` at all.
    `in_chans` input channels (ViTs only; Swin and PVT take 3)."""
    pyramid = models_swin if models_swin.has_model(name) else models_pvt if models_pvt.has_model(name) else None
    if pyramid is not None:  # Swin / PVT: the GAP feature, with the checkpoint's fc_norm when GAP-fine-tuned
        if in_chans != 3:
            raise ValueError(f'--in_chans {in_chans}: only the ViTs of models_vit.py take other channel counts; '
                             f'{name} is a Swin/PVT (use --in_chans 3)')
        encoder = pyramid.create_model(name, img_size=img_size, num_classes=0, fc_norm=layout == 'avg')
    else:
        encoder = models_vit.create_model(name, img_size=img_size, num_classes=0, in_chans=in_chans,
                                          global_pool='avg' if layout == 'avg' else 'token')
    if state is not None:
        load_pretrained(encoder, state)
    encoder.requires_grad_(False)
    return encoder.eval()


@torch.no_grad()
def extract_features(encoder, images, feature='token', layer=None):
    """Features of a frozen ViT, without gradient (put the encoder in eval mode yourself).

    Args:
        encoder: a models_vit.VisionTransformer.
        images: [N, C, H, W].
        feature: 'token' = the cls token after `norm`; 'avg' = the mean of the patch tokens (cls excluded) after
            `norm`. Encoders from GAP-fine-tuned weights have no `norm` but a trained `fc_norm`, applied after the
            mean (the layout they were trained in); no other encoder has an `fc_norm` (mae#186).
        layer: block index K (0-based) whose output, then `norm`, is used instead of the last block's.
    Returns: [N, D].
    """
    if isinstance(encoder, PYRAMIDS):  # mean of the last stage's tokens after norm (or fc_norm)
        return encoder.pool(encoder.forward_features(images))  # [N, D]
    if layer is None or layer == len(encoder.blocks) - 1:
        tokens = encoder.forward_features(images)  # [N, 1+L, D], after norm
    else:
        _, outs, _ = encoder.forward_features(images, return_layers=(layer,))
        tokens = encoder.norm(outs[0])  # [N, 1+L, D]
    if feature == 'token':
        return tokens[:, 0]  # [N, D]
    return encoder.fc_norm(tokens[:, 1:].mean(dim=1))  # [N, D]


def check_probe_args(encoder, feature, layer):
    """Reject a --feature other than token/avg and a --probe_layer outside the encoder's blocks."""
    if isinstance(encoder, PYRAMIDS):
        if feature != 'avg' or layer is not None:
            raise ValueError('a Swin or PVT has no cls token and is probed on its last stage: use --feature avg '
                             'and no --probe_layer')
        return
    if feature not in ('token', 'avg'):
        raise ValueError(f"feature must be 'token' or 'avg', got {feature!r}")
    depth = len(encoder.blocks)
    if layer is not None and not 0 <= layer < depth:
        raise ValueError(f'--probe_layer {layer} out of range: the encoder has blocks 0..{depth - 1}')
