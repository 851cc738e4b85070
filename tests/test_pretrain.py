"""main_pretrain.main end to end on tiny synthetic data: exact resume, checkpoint format, bad checkpoints."""
import argparse
import json
import os

import pytest
import torch

import main_pretrain
import models_mae
from util.checkpoint import resume, save_checkpoint, unwrap_model
from util.dist import wrap_model


def read_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def run_a(tmp_path_factory, pretrain_args, image_folder_factory):
    """One uninterrupted 2-epoch run: (data_path, output_dir, returned model)."""
    root = tmp_path_factory.mktemp('pretrain')
    data = image_folder_factory(root / 'data')
    out = root / 'a'
    model = main_pretrain.main(pretrain_args(data, out))
    return data, str(out), model


def test_resumed_run_equals_uninterrupted_run(run_a, tmp_path, pretrain_args):
    """1 epoch, then a rerun with --epochs 2 in the same folder (auto-resume from checkpoint-last.pth) ends with the
    same weights, optimizer state and epoch-1 loss as one 2-epoch run."""
    data, out_a, _ = run_a
    out_b = tmp_path / 'b'
    main_pretrain.main(pretrain_args(data, out_b, '--epochs', '1'))
    assert torch.load(out_b / 'checkpoint-last.pth', weights_only=True)['epoch'] == 0
    main_pretrain.main(pretrain_args(data, out_b, '--epochs', '2'))

    a = torch.load(os.path.join(out_a, 'checkpoint-last.pth'), weights_only=True)
    b = torch.load(out_b / 'checkpoint-last.pth', weights_only=True)
    assert a['epoch'] == b['epoch'] == 1
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        torch.testing.assert_close(b['model'][k], a['model'][k], atol=1e-7, rtol=0, msg=k)
    for i, state in a['optimizer']['state'].items():
        torch.testing.assert_close(b['optimizer']['state'][i]['exp_avg'], state['exp_avg'], atol=1e-7, rtol=0)
    log_a, log_b = read_log(out_a), read_log(out_b)
    assert [r['epoch'] for r in log_b] == [0, 1]
    assert log_b[1]['train_loss'] == pytest.approx(log_a[1]['train_loss'], abs=1e-7)


def test_checkpoint_format(run_a):
    """checkpoint-last.pth loads with weights_only=True, holds args as a dict and the unwrapped model's keys; the
    final epoch is also kept as checkpoint-1.pth; no temporary file is left behind."""
    _, out, model = run_a
    ckpt = torch.load(os.path.join(out, 'checkpoint-last.pth'), map_location='cpu', weights_only=True)
    assert {'model', 'optimizer', 'epoch', 'args', 'rng'} <= ckpt.keys()
    assert isinstance(ckpt['args'], dict) and ckpt['args']['model'] == 'mae_vit_test'
    assert list(ckpt['model']) == list(model.state_dict())
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt['model'][k], v), k
    files = os.listdir(out)
    assert {'checkpoint-1.pth', 'checkpoint-last.pth', 'log.txt'} <= set(files)
    assert 'checkpoint-0.pth' not in files  # --save_freq 20: only the final epoch is kept besides -last
    assert not [f for f in files if '.tmp' in f], files


def test_log_lines(run_a):
    """log.txt has one JSON line per epoch with train_* keys, the epoch and the parameter count."""
    _, out, model = run_a
    rows = read_log(out)
    assert [r['epoch'] for r in rows] == [0, 1]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for r in rows:
        assert r['n_parameters'] == n_params
        assert r['train_skipped_images'] == 0 and r['train_skipped_steps'] == 0
        assert torch.isfinite(torch.tensor(r['train_loss'])) and r['train_loss'] > 0


def test_unwrap_and_save_strip_compile_wrapper(tmp_path):
    """unwrap_model(torch.compile(m)) is m, and a checkpoint saved from the compiled wrapper has the plain keys
    (torch.compile is lazy: nothing is compiled here)."""
    model = models_mae.mae_vit_test()
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    assert any(k.startswith('_orig_mod.') for k in compiled.state_dict())  # the wrapper does add a prefix
    args = argparse.Namespace(output_dir=str(tmp_path), model='mae_vit_test')
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(args, 0, compiled, optimizer)
    ckpt = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert list(ckpt['model']) == list(model.state_dict())


@pytest.mark.parametrize('flags, mode', [([], None), (['--compile_mode', 'reduce-overhead'], 'reduce-overhead'),
                                         (['--compile_mode', 'max-autotune'], 'max-autotune')])
def test_compile_mode_reaches_torch_compile(monkeypatch, flags, mode):
    """--compile_mode is handed to torch.compile (None for 'default'); nothing is compiled without --compile; an
    unknown mode is refused by the parser, naming the flag."""
    calls = []
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: calls.append(kw) or m)
    model = models_mae.mae_vit_test()
    args = main_pretrain.get_args_parser().parse_args(flags)
    args.distributed = False
    assert wrap_model(model, args) is model and calls == []
    args = main_pretrain.get_args_parser().parse_args(['--compile', *flags])
    args.distributed = False
    wrap_model(model, args)
    assert calls == [{'mode': mode}]


def test_unknown_compile_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        main_pretrain.get_args_parser().parse_args(['--compile', '--compile_mode', 'fastest'])
    assert '--compile_mode' in capsys.readouterr().err


def test_truncated_checkpoint_error_names_the_file(run_a, tmp_path, pretrain_args):
    """Auto-resume from a checkpoint-last.pth cut in half fails with an error that names the file."""
    data, out_a, _ = run_a
    path = tmp_path / 'checkpoint-last.pth'
    with open(os.path.join(out_a, 'checkpoint-last.pth'), 'rb') as f:
        blob = f.read()
    path.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(RuntimeError) as e:
        main_pretrain.main(pretrain_args(data, tmp_path, '--epochs', '3'))
    assert str(path) in str(e.value)


def test_foreign_checkpoint_is_refused_clearly(tmp_path):
    """--resume with a weights-only dict (no 'optimizer') names the file and the missing entry."""
    model = models_mae.mae_vit_test()
    path = tmp_path / 'foreign.pth'
    torch.save({'model': model.state_dict()}, path)
    args = argparse.Namespace(resume=str(path), output_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as e:
        resume(args, model, torch.optim.AdamW(model.parameters()))
    assert str(path) in str(e.value) and "'optimizer'" in str(e.value)


def test_checkpoint_of_another_model_is_refused(run_a, tmp_path):
    """Resuming a checkpoint into a model of another shape fails, naming the file."""
    _, out_a, _ = run_a
    path = os.path.join(out_a, 'checkpoint-last.pth')
    model = models_mae.mae_vit_test(embed_dim=64)
    args = argparse.Namespace(resume=path, output_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as e:
        resume(args, model, torch.optim.AdamW(model.parameters()))
    assert path in str(e.value)


def test_nothing_to_do_when_finished(run_a, tmp_path, pretrain_args):
    """Rerunning a finished run in its folder trains nothing and leaves the weights as they were."""
    import shutil
    data, out_a, _ = run_a
    out = tmp_path / 'done'
    shutil.copytree(out_a, out)
    before = torch.load(out / 'checkpoint-last.pth', weights_only=True)['model']
    model = main_pretrain.main(pretrain_args(data, out))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(read_log(out)) == 2


def test_simmim_gets_its_optimiser_and_crop_defaults(tmp_path, image_folder_factory, monkeypatch):
    """On real data, simmim_swin_* takes SPEC's SimMIM row (betas (0.9, 0.99), clip 5, crop scale 0.67, blr 4e-4
    per 2048) and MAE keeps its own (0.95, no clip, 0.08); any flag still overrides."""
    import main_pretrain
    seen = {}
    monkeypatch.setattr(main_pretrain, 'train_one_epoch', lambda *a, **k: seen.setdefault('args', a[5]) and {})
    monkeypatch.setattr(main_pretrain, 'end_epoch', lambda *a, **k: None)
    data = image_folder_factory(tmp_path / 'data', n_per_class=4)

    def run(*argv):
        seen.clear()
        args = main_pretrain.get_args_parser().parse_args([
            '--data_path', str(data), '--output_dir', '', '--batch_size', '4', '--epochs', '1', '--num_workers', '0',
            '--device', 'cpu', *argv])
        model = main_pretrain.main(args)
        return args, model

    args, _ = run('--model', 'simmim_swin_test', '--input_size', '64')
    assert (args.beta2, args.clip_grad, args.min_crop_scale, args.mask_ratio) == (0.99, 5.0, 0.67, 0.6)
    assert args.blr == pytest.approx(4e-4 * 256 / 2048)
    args, _ = run('--model', 'mae_vit_test', '--input_size', '32')
    assert (args.beta2, args.clip_grad, args.min_crop_scale, args.mask_ratio) == (0.95, None, 0.08, 0.75)
    args, _ = run('--model', 'simmim_swin_test', '--input_size', '64', '--beta2', '0.9', '--min_crop_scale', '0.3')
    assert (args.beta2, args.min_crop_scale) == (0.9, 0.3)


def test_swin_presets_use_each_factorys_own_input_size():
    """On real data a SimMIM Swin pre-trains at its factory's size: the 224-px light Swin and D² teacher (window 7)
    cannot split a 192-px input's maps into windows, so a single 192 preset made them fail. Every pyramid factory
    builds at its preset size; the light Swin takes MAE-Lite's 400 epochs."""
    import models_swin
    for name in [*models_swin.ALIASES, 'simmim_swin_tiny_patch4_window8_256']:
        if not name.startswith(('simmim_swin', 'mae_swin')):
            continue
        preset = main_pretrain.swin_defaults(name)
        with torch.device('meta'):  # shapes only: fast
            model = models_swin.create_model(name, img_size=preset['input_size'])
        assert model.patch_embed.grid_size[0] * model.patch_embed.patch_size == preset['input_size'], name
    assert main_pretrain.swin_defaults('simmim_swin_light')['input_size'] == 224
    assert main_pretrain.swin_defaults('simmim_swin_tiny')['input_size'] == 192
    assert main_pretrain.swin_defaults('simmim_swin_light')['epochs'] == 400
    assert main_pretrain.swin_defaults('simmim_swin_tiny')['epochs'] == 100
    assert main_pretrain.swin_defaults('mae_pvt_small')['input_size'] == 256
