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


def step_unless(optimizer, skip):
    """`optimizer.step()` unless `skip` (a 0-d bool tensor), decided on the device with no host synchronisation:
    fused Adam/AdamW/SGD read a `found_inf` tensor, the way GradScaler hands it to them."""
    optimizer.grad_scale, optimizer.found_inf = None, skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def check_nonfinite(epoch, it, loss, n_skipped, worst_run, args):
    """Warn about the steps skipped since the last check; abort after `args.max_nonfinite` in a row."""
    if n_skipped:
        log.warning(f'epoch {epoch} iter {it}: {n_skipped} optimizer step(s) skipped since the last check for a '
                    f'non-finite loss/gradient (last loss {loss.item():.4g}; {worst_run} in a row at most)')
    if worst_run >= args.max_nonfinite:
        raise NonFiniteLossError(
            f'{worst_run} optimizer steps in a row had a non-finite loss or gradient (epoch {epoch}, iteration '
            f'{it}). Training stopped; checkpoint-last.pth holds the last good epoch. Try a lower --blr, '
            f'--clip_grad, or --amp bf16/none instead of fp16.')


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
    row abort the run. With a fused optimizer and no `after_step` the skip is decided on the device and nothing
    is read back to the host between progress lines (so a GPU never waits for the CPU); the abort then comes at
    the next progress line. A batch with no readable image is skipped (replayed at zero weight under DDP).
    Returns: dict of epoch averages (over ranks) plus `skipped_steps` and `skipped_images`.
    """
    if torch.device(args.device).type == 'cpu':
        perf.keep_freed_memory()  # reuse freed activation buffers instead of re-faulting them every step
    model.train(True)
    metric_logger = MetricLogger(header=f'Epoch: [{epoch}]')
    accum = args.accum_iter
    params = [p for g in optimizer.param_groups for p in g['params']]
    max_norm = args.clip_grad if args.clip_grad else math.inf
    skipped_images = skipped_before = 0
    # Fused optimizers take the skip decision as a device tensor (`found_inf`, as GradScaler passes it), so a step
    # needs no host synchronisation; an after_step hook (EMA, momentum encoder) needs the decision on the host.
    device_skip = after_step is None and getattr(optimizer, '_step_supports_amp_scaling', False)
    skipped_steps = bad_run = worst_run = torch.zeros((), device=args.device)
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
            # copies: under CUDA graphs (--compile_mode reduce-overhead) the next replay overwrites the step's outputs
            pending.append((loss.detach().clone(), {k: v.detach().clone() if torch.is_tensor(v) else v
                                                    for k, v in metrics.items()}))
        if not last_micro_step:
            continue
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # gradients are identical on every rank after the all-reduce, so every rank takes the same decision
        nonfinite = ~torch.isfinite(grad_norm)
        if scaler:
            scaler.step(optimizer)  # skips by itself on inf/nan
            scaler.update()
        elif device_skip:
            step_unless(optimizer, nonfinite)
        elif not nonfinite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not device_skip:
            nonfinite = bool(nonfinite)  # the host needs the decision now: hooks, or an optimizer without found_inf
            if not nonfinite and after_step is not None:
                after_step(model)
        # Bookkeeping as device tensors: the means cover the steps taken only (weight 0 for a skipped step, so one
        # NaN step cannot make the logged loss NaN), and the run of skipped steps is read at the progress lines.
        taken = 1.0 - torch.as_tensor(nonfinite, dtype=torch.float32, device=grad_norm.device)
        for step_loss, step_metrics in pending:
            metric_logger.update(n=taken, loss=step_loss, **step_metrics)
        metric_logger.update(n=taken, grad_norm=grad_norm)
        metric_logger.update(lr=lr)
        pending.clear()
        skipped_steps = skipped_steps + (1 - taken)
        bad_run = (bad_run + 1) * (1 - taken)  # skipped steps in a row, 0 after a step taken
        worst_run = torch.maximum(worst_run, bad_run)
        if (not device_skip or it // accum % args.print_freq == 0 or it + 1 == n) and float(worst_run) > 0:
            check_nonfinite(epoch, it, loss, int(skipped_steps) - skipped_before, int(worst_run), args)
            skipped_before, worst_run = int(skipped_steps), bad_run
        if log_writer is not None and it // accum % args.print_freq == 0 and float(taken):
            step = int((epoch + it / n) * 1000)  # x-axis in 1/1000 epochs so curves of different batch sizes align
            log_writer.add_scalar('train_loss', loss.item(), step)
            log_writer.add_scalar('lr', lr, step)
    stats = {k: dist.all_reduce_mean(v) for k, v in metric_logger.averages().items()}
    # every rank skips the same steps (same gradients), but each drops its own unreadable images
    stats.update(skipped_steps=int(skipped_steps), skipped_images=int(dist.all_reduce_sum(skipped_images)))
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
