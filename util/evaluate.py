"""Classification accuracy over a loader, exact across ranks: the `test_*` numbers of fine-tuning and linear probe.

References: MAE (engine_finetune.evaluate), with the padding duplicates of DistributedSampler left out so the
numbers do not depend on the number of processes.
"""
import logging

import torch
import torch.nn.functional as F

from util import dist
from util.engine import autocast

log = logging.getLogger(__name__)


def shard_len(loader):
    """How many of this rank's samples are real for a loader made by `util.data.build_loader(train=False)`.

    DistributedSampler without drop_last pads the index list to a multiple of the world size with repeats and deals
    it round-robin, so rank r's real samples are positions r, r+W, ... < len(dataset), and they come first in its
    shard. Returns None when the loader is not of that kind (then nothing is left out)."""
    s = loader.sampler
    if not isinstance(s, torch.utils.data.DistributedSampler) or s.drop_last:
        return None
    return len(range(s.rank, len(s.dataset), s.num_replicas))


@torch.no_grad()
def evaluate(model, loader, args):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of `model` over `loader`, gathered over all ranks.

    Args:
        model: maps images [N, C, H, W] to logits [N, num_classes]; put in eval mode here.
        loader: yields (images, targets, n_skipped) as `util.data.collate_skip` makes.
        args: needs `device` and `amp` (the forward runs under the same autocast as training).
    Returns: dict(acc1, acc5, loss); top-5 is over min(5, num_classes) guesses. NaN when the loader is empty.
    """
    model.eval()
    rows = []
    for images, targets, _ in loader:
        if images.shape[0] == 0:
            continue
        images = images.to(args.device, non_blocking=True)
        targets = targets.to(args.device, non_blocking=True)
        with autocast(args):
            logits = model(images)
        logits = logits.float()  # [N, C]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [N, k]
        hit = top == targets[:, None]  # [N, k]
        loss = F.cross_entropy(logits, targets, reduction='none')  # [N]
        rows.append(torch.stack([hit[:, 0].float(), hit.any(dim=1).float(), loss], dim=1))  # [N, 3]
    rows = torch.cat(rows) if rows else torch.zeros(0, 3, device=args.device)
    n = shard_len(loader)
    if n is not None:
        rows = rows[:n]  # drop the sampler's padding repeats
    rows = dist.all_gather_cat(rows)  # [len(dataset), 3] (less any unreadable images)
    if rows.shape[0] == 0:
        log.warning('evaluate: no images')
        return dict(acc1=float('nan'), acc5=float('nan'), loss=float('nan'))
    acc1, acc5, loss = rows.mean(dim=0).tolist()
    log.info(f'* Acc@1 {100 * acc1:.3f}  Acc@5 {100 * acc5:.3f}  loss {loss:.4f}  ({rows.shape[0]} images)')
    return dict(acc1=100 * acc1, acc5=100 * acc5, loss=loss)
