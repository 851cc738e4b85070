"""Parameter groups and optimizers.

References: MAE (AdamW without weight decay on 1-D parameters and tokens), timm's param-group helpers.
"""
import torch
from timm.optim import param_groups_weight_decay


def no_weight_decay_names(model):
    names = getattr(model, 'no_weight_decay', None)
    return set(names()) if callable(names) else set()


def adamw(model, args, betas=(0.9, 0.999), groups=None):
    """AdamW over the trainable parameters; biases, norm weights (any 1-D tensor) and the names the model lists in
    `no_weight_decay()` get no weight decay. `groups` replaces that grouping (e.g. layer-decay groups).

    Fused (one kernel over every parameter instead of a loop of element-wise ops) on CUDA and CPU: same update to
    float rounding, 3x less optimizer time on a 2-core CPU (docs/BENCHMARKS.md)."""
    if groups is None:
        # keywords, not positions: timm 1.0.31 inserted a parameter before no_weight_decay_list
        groups = param_groups_weight_decay(model, weight_decay=args.weight_decay,
                                           no_weight_decay_list=no_weight_decay_names(model))
    fused = torch.device(args.device).type in ('cuda', 'cpu')
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas, fused=fused)
