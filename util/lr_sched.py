"""Per-iteration learning-rate schedule: linear warmup from 0, then half-cosine to min_lr.

References: MAE (util/lr_sched.py); layer-wise decay scales as in BEiT/MAE fine-tuning.
"""
import math


def lr_at(epoch, lr, min_lr, warmup_epochs, epochs):
    """The base learning rate at a fractional epoch (e.g. 3.25 = a quarter into the fourth epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = min(1.0, (epoch - warmup_epochs) / (epochs - warmup_epochs))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_lr_at(epoch, lr, warmup_epochs, milestones, gamma=0.1):
    """Linear warmup from 0, then step decay: lr * gamma^(number of milestones (fractional epochs) passed).
    ViTDet's detection schedule uses milestones at 24/27 and 26/27 of training."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * gamma ** sum(epoch >= m for m in milestones)


def adjust_learning_rate(optimizer, epoch, args):
    """Set every param group's lr to the schedule at `epoch` times the group's `lr_scale` (1 if absent).
    The schedule is warmup + cosine, or warmup + step decay when `args.lr_milestones` (fractional epochs) is set.
    Returns the unscaled lr."""
    if getattr(args, 'lr_milestones', None):
        lr = step_lr_at(epoch, args.lr, args.warmup_epochs, args.lr_milestones)
    else:
        lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    return lr
