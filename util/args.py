"""The parent argument parser: flags every recipe shares. Recipes add their own and set their defaults.

References: MAE (main_pretrain.py / main_finetune.py flags, kept with the same names).
"""
import argparse

COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')  # torch.compile's


def common_parser():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group('schedule')
    g.add_argument('--batch_size', type=int, default=None,
                   help='batch size per process; effective batch = batch_size * accum_iter * world size '
                        '(default: the recipe\'s)')
    g.add_argument('--epochs', type=int, default=None, help='default: the recipe\'s (shorter on the demo data)')
    g.add_argument('--accum_iter', type=int, default=1,
                   help='accumulate gradients over this many iterations (to reach a larger effective batch)')
    g.add_argument('--lr', type=float, default=None,
                   help='absolute learning rate; when unset, lr = blr * effective batch / 256')
    g.add_argument('--blr', type=float, default=None, help='base learning rate per 256 images (default: the recipe\'s)')
    g.add_argument('--min_lr', type=float, default=0.0, help='lower end of the cosine schedule')
    g.add_argument('--warmup_epochs', type=float, default=None,
                   help='linear warmup from 0, counted per iteration (default: the recipe\'s)')
    g.add_argument('--weight_decay', type=float, default=None,
                   help='weight decay (default: the recipe\'s); never applied to biases, norms, pos-embed or tokens')
    g.add_argument('--clip_grad', type=float, default=None, help='clip the gradient norm to this (off when unset)')
    g = p.add_argument_group('data')
    g.add_argument('--data_path', default='',
                   help='ImageNet-style folder with train/ and val/ class subfolders; empty = the embedded demo data '
                        '(scikit-learn digits) with demo-sized defaults')
    g.add_argument('--input_size', type=int, default=None, help='image size (224; 32 for the demo data)')
    g.add_argument('--num_workers', type=int, default=4, help='data-loading processes per training process')
    g.add_argument('--pin_mem', action=argparse.BooleanOptionalAction, default=True,
                   help='pin CPU memory for faster host-to-GPU copies')
    g = p.add_argument_group('run')
    g.add_argument('--output_dir', default='./output_dir',
                   help='checkpoints and log.txt go here; rerunning the same command resumes from checkpoint-last.pth')
    g.add_argument('--log_dir', default=None, help='TensorBoard event folder (off when unset)')
    g.add_argument('--resume', default='', help='checkpoint to continue training from (default: the output_dir\'s '
                                                'checkpoint-last.pth if there is one)')
    g.add_argument('--save_freq', type=int, default=20,
                   help='also keep checkpoint-{epoch}.pth every this many epochs (checkpoint-last.pth is '
                        'rewritten every epoch)')
    g.add_argument('--print_freq', type=int, default=20, help='log a progress line every this many iterations')
    g.add_argument('--device', default='auto', help="'auto' (CUDA if available), 'cuda', 'cuda:N' or 'cpu'")
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'none'],
                   help='autocast dtype. auto = bf16 on GPUs that support it, fp16 (with a loss scaler) on older '
                        'GPUs, none on CPU (bf16 autocast is slower than fp32 on typical CPUs)')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the model (checkpoints still hold the plain module\'s keys)')
    g.add_argument('--compile_mode', default='default', choices=COMPILE_MODES,
                   help='torch.compile mode with --compile: reduce-overhead captures the forward and backward as CUDA '
                        'graphs (every training forward is one graph with static shapes and no host sync, '
                        'tests/test_static_graphs.py); max-autotune also searches GEMM kernels')
    g.add_argument('--max_nonfinite', type=int, default=20,
                   help='abort after this many optimizer steps in a row with a non-finite loss or gradient '
                        '(each such step is skipped)')
    return p


def channel_parser():
    """--in_chans, --mean, --std: the input channels and their normalisation, for the recipes that read images into
    a ViT (pre-training, fine-tuning, linear probe, k-NN, analysis). util.data.channel_stats checks them."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group('input channels')
    g.add_argument('--in_chans', type=int, default=3,
                   help='input channels (models_vit / models_mae ViTs; Swin, PVT and Hiera take 3): 3 = RGB images '
                        '(default); 1 = the same image files read as greyscale; any other count = the class folders '
                        'hold .npy arrays of shape [H, W, in_chans] (uint8, scaled to [0, 1], or float, as stored)')
    g.add_argument('--mean', type=float, nargs='+', default=None,
                   help='per-channel normalisation mean, one value per input channel (default: ImageNet\'s for 3 '
                        'channels, their average 0.449 for 1; required for any other --in_chans)')
    g.add_argument('--std', type=float, nargs='+', default=None,
                   help='per-channel normalisation std, one value per input channel (default: ImageNet\'s for 3 '
                        'channels, their average 0.226 for 1; required for any other --in_chans)')
    return p


def require_rgb(args, kind):
    """Raise when --in_chans is not 3 for a `kind` of model that is only wired for RGB inputs here."""
    if getattr(args, 'in_chans', 3) != 3:
        raise ValueError(f'--in_chans {args.in_chans}: only the ViTs of models_vit.py / models_mae.py take other '
                         f'channel counts; --model {args.model} is a {kind} (use --in_chans 3)')


def resolve_lr(args):
    """lr = blr * effective batch / 256 unless --lr was given. Sets args.eff_batch_size and args.lr."""
    args.eff_batch_size = args.batch_size * args.accum_iter * args.world_size
    if args.lr is None:
        args.lr = args.blr * args.eff_batch_size / 256
    return args.lr


def fill_defaults(args, defaults, demo_defaults=None):
    """Give every flag left unset (None) the recipe's default, or its demo default when --data_path is empty, so
    `python main_X.py` alone runs a demo-sized job on the embedded data and any flag still overrides."""
    demo = (demo_defaults or {}) if not args.data_path else {}
    chosen = {**defaults, **demo}
    for k, v in chosen.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args
