"""One checkpoint format for every recipe: atomic save, auto-resume with RNG state, model unwrapping.

Layout: {'model': state dict of the unwrapped, uncompiled module, 'optimizer', 'scaler', 'epoch', 'args': dict,
'rng': per-rank RNG states, ...}. `args` is a plain dict so `torch.load(weights_only=True)` reads it.
References: MAE (util/misc.py save_model/load_model), extended with atomic writes and RNG state.
"""
import logging
import os

import torch

from util.dist import get_rank, get_world_size, is_main_process
from util.rng import gather_rng_states, set_rng_state

log = logging.getLogger(__name__)


def unwrap_model(model):
    """Strip DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def args_to_dict(args):
    """vars(args) with every value reduced to types `torch.load(weights_only=True)` accepts."""
    def clean(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return str(v)
    return {k: clean(v) for k, v in vars(args).items()}


def atomic_save(obj, path):
    """Write to a temporary file, fsync, then rename: a crash never leaves a half-written checkpoint at `path`."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(args, epoch, model, optimizer, scaler=None, names=('last',), extra=None):
    """Save {model, optimizer, scaler, epoch, args, rng, **extra} as checkpoint-{name}.pth for each name.
    Collective (gathers RNG states); only rank 0 writes."""
    rng = gather_rng_states()
    if not args.output_dir or not is_main_process():
        return
    obj = {'model': unwrap_model(model).state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
           'args': args_to_dict(args), 'rng': rng}
    if scaler is not None:
        obj['scaler'] = scaler.state_dict()
    obj.update(extra or {})
    for name in names:
        atomic_save(obj, os.path.join(args.output_dir, f'checkpoint-{name}.pth'))


def load_file(path):
    """torch.load on CPU with weights_only, turning unreadable files into an error that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, not a checkpoint at all
        raise RuntimeError(f'could not read checkpoint {path!r} ({type(e).__name__}: {str(e).splitlines()[0]}). '
                           'It is truncated, corrupt, or not a PyTorch checkpoint.') from None


def resume_path(args):
    """--resume if given; else output_dir/checkpoint-last.pth if it exists (rerunning a killed command resumes)."""
    if args.resume:
        return args.resume
    last = os.path.join(args.output_dir or '', 'checkpoint-last.pth')
    return last if args.output_dir and os.path.isfile(last) else ''


def resume(args, model, optimizer, scaler=None):
    """Restore model (strict), optimizer, scaler, RNG state and return the epoch to start from (0 when fresh)."""
    path = resume_path(args)
    if not path:
        return 0
    ckpt = load_file(path)
    for key in ('model', 'optimizer', 'epoch'):
        if key not in ckpt:
            raise RuntimeError(f'{path!r} has no {key!r} entry: not a training checkpoint of this repo '
                               '(to start from pre-trained weights use --finetune or --teacher, not --resume)')
    try:
        unwrap_model(model).load_state_dict(ckpt['model'], strict=True)
    except RuntimeError as e:
        raise RuntimeError(f'{path!r} does not match the model being trained (same --model?):\n{e}') from None
    optimizer.load_state_dict(ckpt['optimizer'])
    if scaler is not None and 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    rng = ckpt.get('rng')
    if rng and len(rng) == get_world_size():
        set_rng_state(rng[get_rank()])
    elif rng:
        log.warning(f'checkpoint was written by {len(rng)} processes, now {get_world_size()}: RNG state not restored')
    log.info(f'resumed from {path} (epoch {ckpt["epoch"]} done)')
    return ckpt['epoch'] + 1
