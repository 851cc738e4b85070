"""D² on Swin (SPEC §3.4, main_distill --method d2_swin): gradient routing of the extra block, the teacher on the
student's masked input, the export that loads strictly into the plain Swin, and a demo run through main()."""
import json
import os
import types

import pytest
import torch

import main_distill
import masking
import models_swin
from main_distill import SwinD2Distiller, export_swin_encoder
from util.pretrained import load_pretrained

pytestmark = pytest.mark.usefixtures('one_thread')


def distiller(alpha=1.0):
    """simmim_swin_test (16-d, window 4, 8-px mask patches) with one extra last block (2-2-3), and a 32-d teacher:
    4 heads each in the last stage, as the light Swin and Swin-T have 24 each."""
    torch.manual_seed(0)
    student = models_swin.simmim_swin_test_d2()
    teacher = models_swin.simmim_swin_test(embed_dim=32).requires_grad_(False).eval()
    return SwinD2Distiller(student, teacher, alpha)


def block_mask(n, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    return masking.block_masking(n, (4, 4), 4, 0.6, torch.device('cpu'), g)  # [n, 16*16], 8-px mask patches


def grads(module):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


def test_extra_block_gets_only_the_distillation_gradient_and_the_decoder_only_the_reconstruction():
    imgs, mask = torch.randn(2, 3, 32, 32), block_mask(2)
    out = {}
    for alpha in (0.0, 1.0):
        d = distiller(alpha)
        loss, metrics = d(imgs, mask=mask)
        assert metrics['loss_attn'] > 0 and metrics['loss_rec'] > 0
        loss.backward()
        out[alpha] = grads(d.model)
    extra = 'layers.2.blocks.2.'
    extra_names = [n for n in out[0.0] if n.startswith(extra)]
    # attention-only: norm1, qkv and the position MLP; no projection, norm2 or MLP
    assert extra_names and not any(k in n for n in extra_names for k in ('.proj.', '.mlp.', '.norm2.'))
    assert all(not out[0.0][n].any() for n in extra_names)  # α = 0: no gradient reaches the extra block
    assert all(out[1.0][n].abs().sum() > 0 for n in extra_names)
    assert [n for n, g in out[1.0].items() if not g.abs().sum() > 0] == []  # every student parameter trains
    for n in (k for k in out[0.0] if k.startswith('decoder.')):  # the distillation term never reaches the decoder
        torch.testing.assert_close(out[1.0][n], out[0.0][n])
    before = 'layers.2.blocks.1.attn.qkv.weight'  # the block feeding both: reconstruction + distillation
    assert out[0.0][before].abs().sum() > 0 and not torch.allclose(out[0.0][before], out[1.0][before])


def test_teacher_gets_no_gradient_and_sees_the_students_masked_input(monkeypatch):
    d = distiller()
    student, teacher = d.model, d.teacher[0]
    seen = {}

    def record(name, module):
        embed = module.embed_masked

        def wrapped(imgs, mask):
            x = embed(imgs, mask)
            seen[name] = (imgs, mask, x)
            return x
        monkeypatch.setattr(module, 'embed_masked', wrapped)
    record('student', student)
    record('teacher', teacher)
    imgs = torch.randn(2, 3, 32, 32)
    loss, _ = d(imgs, mask_ratio=0.6)
    loss.backward()
    assert seen['teacher'][0] is imgs and torch.equal(seen['teacher'][1], seen['student'][1])
    m = seen['student'][1].view(2, 16, 16).bool()
    assert 0 < m.float().mean() < 1
    # the masked tokens show the teacher's own mask token, the others its patch embedding
    x_t = seen['teacher'][2]
    torch.testing.assert_close(x_t[m], teacher.mask_token.expand(int(m.sum()), -1))
    torch.testing.assert_close(x_t[~m], teacher.patch_embed(imgs)[~m])
    assert not x_t.requires_grad
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith('teacher') for k in d.state_dict())


def test_windows_that_differ_between_student_and_teacher_and_non_simmim_models_are_rejected():
    d = distiller()
    d.teacher[0] = models_swin.simmim_swin_test(embed_dim=32, window_size=2).eval()
    with pytest.raises(ValueError, match='window'):
        d(torch.randn(1, 3, 32, 32), mask=block_mask(1))
    with pytest.raises(ValueError, match='--model'):
        SwinD2Distiller(models_swin.swin_test(), models_swin.simmim_swin_test())


def test_export_drops_the_extra_block_and_loads_strictly_into_the_plain_light_swin(tmp_path):
    torch.manual_seed(0)
    student = models_swin.simmim_swin_light_d2_patch4_window7_224()
    assert student.depths == (2, 2, 6, 3)
    SwinD2Distiller(student, models_swin.simmim_swin_test(embed_dim=32, num_heads=(1, 2, 24)))  # 24 -> 24 heads
    args = types.SimpleNamespace(output_dir=str(tmp_path), input_size=224, method='d2_swin',
                                 model='simmim_swin_light_d2')
    export_swin_encoder(args, student)
    ckpt = torch.load(tmp_path / 'checkpoint-encoder.pth', weights_only=True)
    plain = models_swin.swin_light_patch4_window7_224(num_classes=0)
    plain.load_state_dict(ckpt['model'], strict=True)
    src = student.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, src[k]), k
    assert isinstance(ckpt['args'], dict) and ckpt['args']['depths'] == [2, 2, 6, 2]


def test_d2_swin_demo_two_epochs_falling_loss_through_main(demo_dir, tmp_path):
    """2 demo epochs (simmim_swin_test_d2 student, simmim_swin_test teacher): falling loss, the teacher not in the
    checkpoint, the export loading strictly into the plain test Swin and through the shared loader."""
    out = str(tmp_path / 'run')
    args = main_distill.get_args_parser().parse_args([
        '--method', 'd2_swin', '--model', 'simmim_swin_test_d2', '--teacher_model', 'simmim_swin_test',
        '--batch_size', '64', '--epochs', '2', '--warmup_epochs', '0', '--num_workers', '0', '--output_dir', out,
        '--blr', '2e-3', '--print_freq', '100'])
    main_distill.main(args)
    logs = [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]
    assert [r['epoch'] for r in logs] == [0, 1]
    assert logs[1]['train_loss'] < logs[0]['train_loss']
    assert logs[1]['train_loss_attn'] < logs[0]['train_loss_attn']
    ckpt = torch.load(os.path.join(out, 'checkpoint-last.pth'), weights_only=True)
    assert not any(k.startswith('teacher') for k in ckpt['model'])
    assert 'adapters.0.weight' in ckpt['model'] and 'model.layers.2.blocks.2.attn.qkv.weight' in ckpt['model']
    enc = torch.load(os.path.join(out, 'checkpoint-encoder.pth'), weights_only=True)['model']
    plain = models_swin.swin_test(num_classes=0)
    plain.load_state_dict(enc, strict=True)
    assert torch.equal(plain.layers[2].blocks[1].attn.qkv.weight,
                       ckpt['model']['model.layers.2.blocks.1.attn.qkv.weight'])
    info = load_pretrained(models_swin.swin_test(), os.path.join(out, 'checkpoint-encoder.pth'))
    assert info['missing'] == ['head.fc.weight', 'head.fc.bias']
