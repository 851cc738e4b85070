"""Layer-wise lr decay for mmseg models whose backbone uses our parameter names.

mmseg's `LayerDecayOptimizerConstructor` finds layer ids by matching `backbone.layers.N` (its own BEiT/MAE names);
our backbones are named like timm (`backbone.blocks.N`, `backbone.pos_embed`, ...), so with mmseg's constructor
every backbone parameter would silently get the top layer's lr. This constructor asks the backbone for its layer-id
function (`backbone.lr_layers()`, the same functions fine-tuning uses, from util/lr_decay.py) and builds the groups
with util.lr_decay.param_groups_lrd:
  ViT: cls_token / pos_embed / patch_embed -> 0, blocks.i -> i + 1; neck and heads -> depth + 1 (lr scale 1);
  lr of layer id i = base lr × layer_decay_rate ** (num_layers - i).
Weight decay: none for 1-D parameters (norms, biases, q/v biases), pos_embed, cls_token and relative position tables.

Config:
    optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
                         constructor='MIMLayerDecayOptimWrapperConstructor',
                         paramwise_cfg=dict(layer_decay_rate=0.75))

References: BEiT (layer decay), MAE util/lr_decay.py; mmengine DefaultOptimWrapperConstructor (the interface).
"""
import logging

from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

from util.lr_decay import param_groups_lrd

log = logging.getLogger(__name__)
NO_DECAY = ('pos_embed', 'cls_token', 'relative_position_bias_table', 'absolute_pos_embed', 'mask_token')


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MIMLayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """paramwise_cfg: `layer_decay_rate` (1.0 = no decay). The model must have a `backbone` with `lr_layers()`."""

    def add_params(self, params, module, **kwargs):
        rate = self.paramwise_cfg.get('layer_decay_rate', 1.0)
        backbone = module.backbone
        if not hasattr(backbone, 'lr_layers'):
            raise TypeError(f'{type(backbone).__name__} has no lr_layers(): this constructor is for the backbones '
                            'of seg/backbones.py; use mmseg\'s own constructor for mmseg backbones')
        backbone_layer_id, num_layers = backbone.lr_layers()

        def layer_id(name, n):
            # backbone parameters by the backbone's rule; neck and heads are above the last block (scale 1)
            return backbone_layer_id(name[len('backbone.'):], n) if name.startswith('backbone.') else n

        groups = param_groups_lrd(module, weight_decay=self.base_wd or 0.0, layer_decay=rate,
                                  no_weight_decay_list=NO_DECAY, layer_id_fn=layer_id, num_layers=num_layers)
        for g in groups:  # mmengine's schedulers scale each group's own lr, so set it here
            g['lr'] = self.base_lr * g['lr_scale']
        params.extend(groups)
        log.info(f'layer decay {rate}: {len(groups)} parameter groups, lr scales '
                 f'{sorted({round(g["lr_scale"], 4) for g in groups})}')
