"""Distributed setup from torchrun's or SLURM's environment, and collectives that are no-ops at world size 1.

References: MAE (util/misc.py init_distributed_mode), PyTorch torchrun environment variables.
"""
import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def init_distributed_mode(args):
    """Set args.distributed, args.rank, args.world_size, args.gpu and args.device; start the process group if
    launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, with
    MASTER_ADDR/MASTER_PORT set by the job script). Without either, runs as one process with no process group.
    Backend: NCCL on CUDA, gloo on CPU."""
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:
        args.rank, args.world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        args.gpu = int(env.get('LOCAL_RANK', 0))
    elif 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', 1)) > 1:
        args.rank, args.world_size = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        args.gpu = int(env.get('SLURM_LOCALID', 0))
        if 'MASTER_ADDR' not in env:
            raise RuntimeError('under SLURM, export MASTER_ADDR (the first node of the job) and MASTER_PORT before srun')
        env.setdefault('MASTER_PORT', '29500')
        env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK'] = str(args.rank), str(args.world_size), str(args.gpu)
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        args.device = resolve_device(args.device, 0)
        return
    args.distributed = True
    args.device = resolve_device(args.device, args.gpu)
    backend = 'nccl' if args.device.startswith('cuda') else 'gloo'
    if args.device.startswith('cuda'):
        torch.cuda.set_device(args.gpu)
    dist.init_process_group(backend=backend, init_method='env://', world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=30))
    dist.barrier()


def wrap_model(model, args):
    """DDP (when launched distributed), then torch.compile (with --compile) around `model`, already on its device.
    Keep the plain module for the optimizer and checkpoints: their keys never carry `module.` or `_orig_mod.`."""
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if str(args.device).startswith('cuda') else None)
    if getattr(args, 'compile', False):
        mode = getattr(args, 'compile_mode', 'default')
        model = torch.compile(model, mode=None if mode == 'default' else mode)
    return model


def resolve_device(device, local_rank):
    """'auto' picks CUDA when available; a bare 'cuda' becomes this process's GPU."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda':
        device = f'cuda:{local_rank}'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise RuntimeError(f'--device {device} was asked for but CUDA is not available; use --device cpu')
    return device


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_mean(x):
    """Mean of a Python number over ranks, as a float. Identity at world size 1."""
    return all_reduce_sum(x) / get_world_size()


def all_reduce_sum(x):
    """Sum of a Python number over ranks, as a float. Identity at world size 1."""
    if not is_dist():
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.item()


def all_gather_cat(t):
    """Concatenate a tensor's first dimension across ranks (sizes may differ). Identity at world size 1."""
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = t.new_zeros((max(sizes),) + t.shape[1:])
    padded[:t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def _collective_device():
    return f'cuda:{torch.cuda.current_device()}' if dist.get_backend() == 'nccl' else 'cpu'


def cleanup():
    if is_dist():
        dist.destroy_process_group()
