"""Console logging (rank 0 only), smoothed training meters with ETA, the per-epoch JSON log and TensorBoard.

References: MAE / DeiT (util/misc.py MetricLogger) for the progress-line format.
"""
import datetime
import json
import logging
import os
import sys
import time
from collections import deque

import torch

log = logging.getLogger('mim')


def setup_logging(rank=0, output_dir=None):
    """Rank 0 logs INFO to stderr (and to output_dir/train.log); other ranks only WARNING and above."""
    root = logging.getLogger()
    for h in list(root.handlers):  # a second main() in one process (tests, notebooks) must not log twice
        root.removeHandler(h)
        h.close()
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(f'[%(asctime)s{" r" + str(rank) if rank else ""}] %(message)s', '%H:%M:%S')
    handlers = [logging.StreamHandler(sys.stderr)]
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, 'train.log')))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(level)


def _host_floats(xs):
    """Python floats of a list of numbers and 0-d tensors, with one device-to-host read for all the tensors."""
    at = [i for i, x in enumerate(xs) if torch.is_tensor(x)]
    if not at:
        return [float(x) for x in xs]
    read = torch.stack([xs[i].detach().float().reshape(()).to(xs[at[0]].device) for i in at]).tolist()
    out = [float(x) if not torch.is_tensor(x) else None for x in xs]
    for i, v in zip(at, read):
        out[i] = v
    return out


class Meter:
    """A running metric: median/avg over a window and the global average. Values may be device tensors; they are
    turned into floats only when read, so updating costs no host synchronisation."""

    def __init__(self, window=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.pending = []
        self.window = deque(maxlen=window)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value, n=1):
        """Add `value` with weight `n` (either may be a device tensor; weight 0 leaves the value out)."""
        self.pending.append((value, n))

    def _flush(self):
        if not self.pending:
            return
        values, weights = _host_floats([v for v, _ in self.pending]), _host_floats([n for _, n in self.pending])
        self.pending.clear()
        for v, n in zip(values, weights):
            if not n:  # weight 0: a step the loop skipped (non-finite), kept out of every statistic
                continue
            self.window.append(v)
            self.total += v * n
            self.count += n

    @property
    def global_avg(self):
        self._flush()
        return self.total / max(self.count, 1)

    def __str__(self):
        self._flush()
        w = sorted(self.window) or [0.0]
        return self.fmt.format(median=w[len(w) // 2], avg=sum(w) / len(w), global_avg=self.global_avg,
                               value=self.window[-1] if self.window else 0.0)


class MetricLogger:
    """Collects meters and prints a progress line with ETA every `print_freq` iterations."""

    def __init__(self, header=''):
        self.meters = {}
        self.header = header

    def update(self, n=1, **kwargs):
        for k, v in kwargs.items():
            if k not in self.meters:
                self.meters[k] = Meter(fmt='{value:.6f}' if k == 'lr' else '{median:.4f} ({global_avg:.4f})')
            self.meters[k].update(v, n)

    def averages(self):
        return {k: m.global_avg for k, m in self.meters.items()}

    def log_every(self, iterable, print_freq, batch_size_fn=None):
        """Yield from `iterable`, timing data loading and iterations, and log a progress line now and then."""
        n = len(iterable)
        start = end = time.time()
        iter_time, data_time = Meter(fmt='{avg:.4f}'), Meter(fmt='{avg:.4f}')
        images = 0
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            if batch_size_fn is not None:
                images += batch_size_fn(obj)
            iter_time.update(time.time() - end)
            end = time.time()
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i - 1)))
                parts = [f'{self.header} [{i:>{len(str(n))}}/{n}]', f'eta: {eta}']
                parts += [f'{k}: {m}' for k, m in self.meters.items()]
                parts += [f'time: {iter_time}', f'data: {data_time}']
                if images:
                    parts.append(f'img/s: {images / max(end - start, 1e-9):.1f}')
                log.info('  '.join(parts))
        total = time.time() - start
        log.info(f'{self.header} total time: {datetime.timedelta(seconds=int(total))} '
                 f'({total / max(n, 1):.4f} s / it)')


def write_epoch_log(output_dir, stats):
    """Append one JSON line to output_dir/log.txt (rank 0 only): keys `train_*`, `test_*`, `epoch`,
    `n_parameters`, shared by every recipe so the same plotting works across them."""
    from util.dist import is_main_process
    if not output_dir or not is_main_process():
        return
    with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
        f.write(json.dumps(stats) + '\n')


def make_tb_writer(log_dir):
    """A TensorBoard SummaryWriter on rank 0 when `log_dir` is set and tensorboard is installed; else None."""
    from util.dist import is_main_process
    if not log_dir or not is_main_process():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning('--log_dir given but tensorboard is not installed (pip install tensorboard); not writing events')
        return None
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)
