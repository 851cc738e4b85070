"""The one training loop every recipe uses, plus mixed-precision helpers.

References: MAE (engine_pretrain.py / engine_finetune.py), merged into one loop; recipes pass what differs.
"""
import contextlib
import logging
import math
import time

import torch

from util import dist, perf
from util.checkpoint import save_checkpoint
from util.logger import MetricLogger, write_epoch_log
from util.lr_sched import adjust_learning_rate

log = logging.getLogger(__name__)


def amp_dtype(args):
    """The autocast dtype for --amp (None = full precision)."""
    if args.amp == 'auto':
        if not str(args.device).startswith('cuda'):
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}[args.amp]


def autocast(args):
    dtype = amp_dtype(args)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=dtype)


def make_scaler(args):
    """A GradScaler for fp16 only (bf16 and fp32 need none)."""
    if amp_dtype(args) != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(args.device).type)


class NonFiniteLossError(RuntimeError):
    pass


def train_one_epoch(model, step_fn, loader, optimizer, epoch, args, scaler=None, after_step=None, log_writer=None):
    """Train one epoch.

    Args:
        model: the (possibly DDP/compiled) module that `step_fn` calls.
        step_fn(model, images, targets) -> (loss, metrics): the recipe's forward; runs under autocast; `metrics` is a
            dict of scalars (tensors are fine: they are read only at print time).
        loader: yields (images, targets, n_skipped) as `util.data.collate_skip` makes.
        after_step(model): called after every optimizer step (EMA, momentum teachers).
    The lr follows the per-iteration warmup-cosine schedule times each group's `lr_scale`. A step whose gradient
    norm is not finite is skipped and counted, and left out of the epoch means; `args.max_nonfinite` such steps in a
    row abort the run. A batch with no readable image is skipped (replayed at zero weight under DDP).
    Returns: dict of epoch averages (over ranks) plus `skipped_steps` and `skipped_images`.
    """
    if torch.device(args.device).type == 'cpu':
        perf.keep_freed_memory()  # reuse freed activation buffers instead of re-faulting them every step
    model.train(True)
    metric_logger = MetricLogger(header=f'Epoch: [{epoch}]')
    accum = args.accum_iter
    params = [p for g in optimizer.param_groups for p in g['params']]
    max_norm = args.clip_grad if args.clip_grad else math.inf
    skipped_steps = skipped_images = bad_in_a_row = 0
    n = len(loader)
    pending = []  # the micro-steps' (loss, metrics) of this optimizer step, logged only if the step is taken
    last_good = None  # the last readable batch, replayed at zero weight in place of an all-unreadable one
    optimizer.zero_grad(set_to_none=True)
    batch_size_fn = lambda b: b[0].shape[0] * dist.get_world_size()  # noqa: E731
    for it, (images, targets, n_bad) in enumerate(metric_logger.log_every(loader, args.print_freq, batch_size_fn)):
        skipped_images += n_bad
        if it % accum == 0:
            lr = adjust_learning_rate(optimizer, epoch + it / n, args)
        weight = 1.0
        if images.shape[0] == 0:  # every image of this batch was unreadable
            if last_good is None and not dist.is_dist():
                continue
            if last_good is None:
                raise RuntimeError(f'epoch {epoch}: the first batch of rank {dist.get_rank()} had no readable '
                                   f'image ({n_bad} unreadable); check the data folder')
            # Under DDP every rank must run forward and backward, or the gradient all-reduce of the other ranks
            # waits for ever: rerun the last readable batch with its loss multiplied by zero.
            images, targets, weight = *last_good, 0.0
        last_good = images, targets
        images = images.to(args.device, non_blocking=True)
        targets = targets.to(args.device, non_blocking=True)
        last_micro_step = (it + 1) % accum == 0 or it + 1 == n
        # skip the gradient all-reduce on accumulation steps that do not end in an optimizer step
        sync = contextlib.nullcontext() if last_micro_step or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast(args):
                loss, metrics = step_fn(model, images, targets)
            (scaler.scale(loss * (weight / accum)) if scaler else loss * (weight / accum)).backward()
        if weight:
            pending.append((loss.detach(), metrics))
        if not last_micro_step:
            continue
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # gradients are identical on every rank after the all-reduce, so every rank takes the same decision
        finite = bool(torch.isfinite(grad_norm))
        if scaler:
            scaler.step(optimizer)  # skips by itself on inf/nan
            scaler.update()
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if finite:
            bad_in_a_row = 0
            if after_step is not None:
                after_step(model)
            # the epoch means cover the steps taken only: one skipped NaN step must not make the logged loss NaN
            for step_loss, step_metrics in pending:
                metric_logger.update(loss=step_loss, **step_metrics)
            metric_logger.update(lr=lr, grad_norm=grad_norm)
        else:
            skipped_steps += 1
            bad_in_a_row += 1
            log.warning(f'epoch {epoch} iter {it}: non-finite loss/gradient ({loss.item():.4g}); step skipped '
                        f'({bad_in_a_row} in a row)')
            if bad_in_a_row >= args.max_nonfinite:
                raise NonFiniteLossError(
                    f'{bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient (epoch {epoch}, '
                    f'iteration {it}). Training stopped; checkpoint-last.pth holds the last good epoch. Try a '
                    f'lower --blr, --clip_grad, or --amp bf16/none instead of fp16.')
        pending.clear()
        if log_writer is not None and finite and it // accum % args.print_freq == 0:
            step = int((epoch + it / n) * 1000)  # x-axis in 1/1000 epochs so curves of different batch sizes align
            log_writer.add_scalar('train_loss', loss.item(), step)
            log_writer.add_scalar('lr', lr, step)
    stats = {k: dist.all_reduce_mean(v) for k, v in metric_logger.averages().items()}
    # every rank skips the same steps (same gradients), but each drops its own unreadable images
    stats.update(skipped_steps=skipped_steps, skipped_images=int(dist.all_reduce_sum(skipped_images)))
    return stats


def end_epoch(args, epoch, model, optimizer, scaler, n_parameters, train_stats, test_stats=None, log_writer=None,
              also_save=(), extra=None):
    """What every recipe does after an epoch: save checkpoint-last.pth (and checkpoint-{epoch}.pth every
    --save_freq epochs and at the end, plus `also_save` names such as 'best'), write the epoch's JSON line to
    log.txt (`train_*`, `test_*`, `epoch`, `n_parameters`) and the test metrics to TensorBoard."""
    names = ['last', *also_save]
    if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
        names.append(str(epoch))
    save_checkpoint(args, epoch, model, optimizer, scaler, names, extra=extra)
    test_stats = test_stats or {}
    if log_writer is not None:
        for k, v in test_stats.items():
            log_writer.add_scalar(f'test_{k}', v, epoch)
    write_epoch_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                      **{f'test_{k}': v for k, v in test_stats.items()},
                                      'epoch': epoch, 'n_parameters': n_parameters})


def end_training(start_time, log_writer=None):
    """Log the wall time, close TensorBoard and leave the process group."""
    log.info(f'training time {time.strftime("%H:%M:%S", time.gmtime(time.time() - start_time))}')
    if log_writer is not None:
        log_writer.close()
    dist.cleanup()
