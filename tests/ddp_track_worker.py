"""Run by tests/test_track.py under torchrun: a 1-epoch track/train.py run on CPU (gloo), evaluated by rank 0.

  python -m torch.distributed.run --nproc_per_node 2 tests/ddp_track_worker.py SEQUENCES_ROOT OUT_DIR

Each rank saves its final weights to OUT_DIR/rank{rank}.pt.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from track import train  # noqa: E402


def main():
    root, out = sys.argv[1], sys.argv[2]
    args = train.get_args_parser().parse_args([
        '--train_sets', f'got10k:{os.path.join(root, "train")}', '--eval_sets', f'got10k:{os.path.join(root, "val")}',
        '--model', 'vit_test', '--patch_size', '4', '--template_size', '16', '--search_size', '32',
        '--head_channels', '32', '--ce_layers', '0,1', '--ce_start_epoch', '0', '--ce_warm_epochs', '0',
        '--batch_size', '8', '--samples_per_epoch', '64', '--epochs', '1', '--num_workers', '0', '--device', 'cpu',
        '--print_freq', '100', '--output_dir', os.path.join(out, 'run')])
    os.makedirs(args.output_dir, exist_ok=True)
    model, _ = train.main(args)  # the unwrapped model; the process group is destroyed by now
    torch.save(model.state_dict(), os.path.join(out, f'rank{os.environ["RANK"]}.pt'))


if __name__ == '__main__':
    main()
