"""LARS in the MoCo-v3 form, the optimizer of the official MAE linear probe.

References:
  LARS    - You et al., "Large Batch Training of Convolutional Networks", 2017.
  MoCo-v3 - Chen et al., "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021 (this form).
  MAE     - He et al., CVPR 2022 (linear probe: LARS, lr 0.1 x batch/256 at batch 16384, no weight decay).
Why not timm's `Lars`: its trust ratio is 0.001*||p|| / (||g|| + wd*||p||) (the LARS paper's bound), not
0.001*||p|| / ||g + wd*p||, and with its default `always_adapt=False` it adapts nothing at weight decay 0 — the
probe's setting. MAE-priv's copy has that same bug (SPEC §4.1).
"""
import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio, MoCo-v3 form.

    For every parameter with ndim > 1, per step:
        g = grad + weight_decay * p
        g = g * trust_coefficient * ||p|| / ||g||      (ratio 1 when ||p|| or ||g|| is 0)
        mu = momentum * mu + g;  p = p - lr * mu
    Parameters with ndim <= 1 (biases, norm weights) get neither weight decay nor the trust ratio: plain momentum.
    The ratio is applied at every weight decay, 0 included.

    Args:
        params: parameters or param-group dicts (groups may override lr, weight_decay, momentum, trust_coefficient).
        lr: learning rate (the schedule in util.lr_sched overwrites it every iteration).
        weight_decay: L2 added to the gradient of ndim > 1 parameters before the trust ratio.
        momentum: heavy-ball momentum (no dampening, no Nesterov).
        trust_coefficient: eta in the trust ratio.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f'invalid LARS setting: lr={lr} weight_decay={weight_decay} momentum={momentum} '
                             f'trust_coefficient={trust_coefficient}')
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group['weight_decay'])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    one = torch.ones_like(p_norm)
                    # torch.where keeps it free of host synchronisation (no `if norm > 0` on a device tensor)
                    trust = torch.where((p_norm > 0) & (g_norm > 0),
                                        group['trust_coefficient'] * p_norm / g_norm.clamp(min=1e-30), one)
                    g = g.mul(trust)
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(p)
                mu = state['momentum_buffer']
                mu.mul_(group['momentum']).add_(g)
                p.add_(mu, alpha=-group['lr'])
        return loss
