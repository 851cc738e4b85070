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


def adjust_learning_rate(optimizer, epoch, args):
    """Set every param group's lr to the schedule at `epoch` times the group's `lr_scale` (1 if absent).
    Returns the unscaled lr."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    return lr
