"""Run by tests/test_ddp.py under torchrun: a 1-epoch, 2-step-per-rank main_pretrain run on CPU (gloo).

  python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py DATA_PATH OUT_DIR

Each rank saves its model's initial weights to OUT_DIR/init{rank}.pt and its final weights to OUT_DIR/rank{rank}.pt.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_pretrain  # noqa: E402
import models_mae  # noqa: E402


def main():
    data, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ['RANK'])
    create = models_mae.create_model

    def create_and_record(*args, **kwargs):  # keep this rank's weights before DDP broadcasts rank 0's
        model = create(*args, **kwargs)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out, f'init{rank}.pt'))
        return model

    models_mae.create_model = create_and_record
    args = main_pretrain.get_args_parser().parse_args([
        '--data_path', data, '--output_dir', os.path.join(out, 'run'), '--model', 'mae_vit_test',
        '--input_size', '32', '--batch_size', '4', '--epochs', '1', '--warmup_epochs', '0', '--num_workers', '0',
        '--device', 'cpu', '--print_freq', '100'])
    model = main_pretrain.main(args)  # returns the unwrapped model; the process group is destroyed by now
    torch.save(model.state_dict(), os.path.join(out, f'rank{rank}.pt'))


if __name__ == '__main__':
    main()
