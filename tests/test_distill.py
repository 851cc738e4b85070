"""Distillation (SPEC §3): the teacher sees the student's visible patches, D² gradient routing, TinyMIM relations,
exports that load downstream, and a short real run through main()."""
import argparse
import json
import os

import pytest
import torch

import main_distill
import main_finetune
import masking
import models_mae
import models_vit
from main_distill import MAEDistiller, RelationDistiller, relation_kl, relations
from util.pretrained import load_pretrained


def teacher(**kw):
    torch.manual_seed(7)
    return models_vit.vit_test(num_classes=0, embed_dim=48, num_heads=3, **kw).requires_grad_(False).eval()


def test_teacher_sees_exactly_the_students_visible_patches():
    """The distilled teacher logits equal the teacher run by hand on the gathered visible patches."""
    torch.manual_seed(0)
    student, t = models_mae.mae_vit_test(), teacher()
    d = MAEDistiller(student, t, [(1, 1)])
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    ids_keep = masking.masking_from_noise(noise, 0.75)[0]
    logits, _ = main_distill.run_teacher(t, imgs, ids_keep, [1], [])
    # by hand: embed all patches, add pos, keep the visible ones, prepend cls
    x = t.patch_embed(imgs) + t.pos_embed[:, 1:]
    x = masking.gather_tokens(x, ids_keep)
    x = torch.cat([(t.cls_token + t.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
    x = t.blocks[0](x)
    e = {}
    t.blocks[1](x, e)
    assert logits[0].shape == (2, 3, 5, 5)  # 1 + 4 visible of 16 at ratio 0.75
    assert torch.allclose(logits[0], e['logits'], atol=1e-6)
    loss, parts = d(imgs, noise=noise)
    adapted = d.adapters[0](d.run_student(student.patchify(imgs), ids_keep)[0][0])
    assert torch.allclose(parts['loss_attn'], torch.nn.functional.mse_loss(adapted, logits[0]), atol=1e-6)
    assert torch.allclose(loss, parts['loss_mae'] + parts['loss_attn'], atol=1e-6)


def test_teacher_runs_only_as_deep_as_its_targets_yet_gives_the_full_run_values():
    """run_teacher stops at the deepest target (the last block's MLP is never run for a last-block logit target)
    and still returns what a full run gives, for every mix of logit and hidden targets."""
    torch.manual_seed(0)
    t = teacher()
    imgs, ids_keep = torch.randn(2, 3, 32, 32), masking.masking_from_noise(torch.rand(2, 16), 0.75)[0]
    x0 = t.embed(imgs, ids_keep)
    _, outs, extras = models_vit.run_blocks(t.blocks, x0, {0, 1}, {0, 1})
    calls = []
    hook = t.blocks[1].mlp.register_forward_hook(lambda *a: calls.append(1))
    for attn_idx, hidden_idx in (([1], []), ([0, 1], [1]), ([0], [2]), ([1], [0, 1])):
        logits, hidden = main_distill.run_teacher(t, imgs, ids_keep, attn_idx, hidden_idx)
        for i, got in zip(attn_idx, logits):
            assert torch.allclose(got, extras[i]['logits'], atol=1e-6)
        full = {0: t.blocks[0].norm1(x0), 1: t.blocks[1].norm1(outs[0]), 2: t.norm(outs[1])}
        for i, got in zip(hidden_idx, hidden):
            assert torch.allclose(got, full[i], atol=1e-6)
    hook.remove()
    assert len(calls) == 1  # only the ([0], [2]) case, whose final-feature target needs the whole teacher


def test_dmae_trains_student_and_adapter_not_teacher():
    torch.manual_seed(0)
    student, t = models_mae.mae_vit_test(), teacher()
    d = MAEDistiller(student, t, [(1, 1)], hidden_pairs=[(2, 2), (1, 0)])
    assert d.adapters[0].weight.shape == (3, 2, 1, 1)  # student 2 heads -> teacher 3 heads
    assert not any(n.startswith('teacher') for n in d.state_dict())
    loss, _ = d(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None for p in t.parameters())
    assert d.adapters[0].weight.grad.abs().sum() > 0
    assert all(a.weight.grad.abs().sum() > 0 for a in d.hidden_adapters)
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_d2_gradients_are_routed_as_specified():
    """Reconstruction reaches only blocks before decode_idx; the blocks after it and the extra block's qkv get the
    distillation gradient only; the extra block keeps only norm1 + qkv."""
    torch.manual_seed(0)
    student = models_mae.mae_vit_test(depth=4)  # 3 blocks + the attention-only 4th
    d = MAEDistiller(student, teacher(), [(3, 1)], decode_idx=2)
    last = student.blocks[3]
    assert not any(k.startswith(('attn.proj', 'mlp', 'norm2')) for k, _ in last.named_parameters())
    d.alpha = 0.0  # reconstruction only
    d(torch.randn(2, 3, 32, 32))[0].backward()
    assert student.blocks[1].mlp.fc2.weight.grad.abs().sum() > 0
    assert student.blocks[2].attn.qkv.weight.grad is None or student.blocks[2].attn.qkv.weight.grad.abs().sum() == 0
    student.zero_grad(set_to_none=True)
    d.alpha = 1.0
    _, parts = d(torch.randn(2, 3, 32, 32))
    parts_loss = parts['loss_attn'].requires_grad
    assert not parts_loss  # reported detached
    loss, _ = d(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert student.blocks[2].attn.qkv.weight.grad.abs().sum() > 0
    assert last.attn.qkv.weight.grad.abs().sum() > 0


def test_tinymim_relations_kl_and_teacher_block():
    torch.manual_seed(0)
    t = teacher(depth=3)
    student = models_vit.vit_test(num_classes=0)  # 2 heads; its last block takes the teacher's 3
    d = RelationDistiller(student, t, teacher_block=2)
    assert student.blocks[-1].attn.num_heads == 3
    img = torch.randn(2, 3, 32, 32)
    x = t.embed(img)
    qk, vv = relations(t.blocks[0], x)
    assert qk.shape == vv.shape == (2, 3, 17, 17)
    assert relation_kl(qk, qk).abs() < 1e-6 and relation_kl(qk, vv) > 0
    loss, parts = d(torch.stack([img, img], 1))
    # teacher_block is honoured: block 2's relations (after one block), not the last block's
    xt = t.blocks[0](t.embed(img))
    tq, _ = relations(t.blocks[1], xt)
    xs, _, _ = models_vit.run_blocks(student.blocks[:-1], student.embed(img))
    sq, _ = relations(student.blocks[-1], xs)
    assert torch.allclose(parts['loss_qk'], relation_kl(tq, sq), atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad)  # nothing ships untrained


def test_tinymim_loss_is_zero_for_a_copy_of_the_teacher():
    """Student = teacher (same weights and heads), same view: both relation KLs are 0; perturbed: positive."""
    t = teacher(depth=2)
    student = models_vit.vit_test(num_classes=0, embed_dim=48, num_heads=3)
    student.load_state_dict(t.state_dict())
    d = RelationDistiller(student, t, teacher_block=2)
    img = torch.randn(2, 3, 32, 32)
    views = torch.stack([img, img], 1)
    loss, _ = d(views)
    assert loss.abs() < 1e-6
    with torch.no_grad():
        student.blocks[0].mlp.fc1.weight.add_(0.1 * torch.randn_like(student.blocks[0].mlp.fc1.weight))
    assert d(views)[0] > 1e-4


def run_distill(method, out, *extra):
    """A short main_distill run on the demo digits with test-sized student and teacher."""
    model = 'vit_test' if method == 'tinymim' else 'mae_vit_test'
    args = main_distill.get_args_parser().parse_args([
        '--method', method, '--model', model, '--teacher_model', 'vit_test', '--batch_size', '64', '--epochs', '2',
        '--warmup_epochs', '0', '--num_workers', '0', '--output_dir', out, '--blr', '2e-3', '--print_freq', '100']
        + (['--depth', '3', '--decode_idx', '1'] if method == 'd2_mae' else []) + list(extra))
    main_distill.main(args)
    return [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]


@pytest.mark.parametrize('method', ['d_mae', 'd2_mae', 'tinymim'])
def test_main_distill_demo_falls_resumes_and_exports(method, demo_dir, tmp_path):
    """2 epochs on the demo data (killed after the first and rerun: auto-resume) with a falling loss; the exported
    encoder loads strictly into a plain ViT and holds the trained weights; the teacher is not saved."""
    out = str(tmp_path / method)
    run_distill(method, out, '--epochs', '1')
    logs = run_distill(method, out)
    assert [r['epoch'] for r in logs] == [0, 1]  # the rerun continued at epoch 1
    assert logs[1]['train_loss'] < logs[0]['train_loss']
    ckpt = torch.load(os.path.join(out, 'checkpoint-last.pth'), weights_only=True)
    assert not any(k.startswith('teacher') for k in ckpt['model'])
    enc = torch.load(os.path.join(out, 'checkpoint-encoder.pth'), weights_only=True)['model']
    vit = models_vit.vit_test(num_classes=0)
    vit.load_state_dict(enc, strict=True)  # D²: block 13 gone, depth 2 as the plain ViT
    assert torch.equal(vit.blocks[0].attn.qkv.weight, ckpt['model']['model.blocks.0.attn.qkv.weight'])
    load_pretrained(models_vit.vit_test(), os.path.join(out, 'checkpoint-encoder.pth'))  # the downstream path


def test_real_data_recipe_defaults_per_method(tmp_path, image_folder_factory, monkeypatch):
    """With --data_path, TinyMIM takes SPEC's 300 epochs / 15 warmup (drop path 0.1, crop 0.2) and D² on Swin the
    SimMIM light-Swin row (400 epochs, 10 warmup, blr 4e-4 per 2048, AdamW betas (0.9, 0.99), clip 5, crop 0.67);
    D-MAE keeps the MAE row; an explicit flag still wins."""
    seen = {}

    def fake_epoch(model, step, loader, optimizer, epoch, args, *a, **k):
        seen.update(args=args, betas=optimizer.param_groups[0]['betas'], model=model)
        return {}

    monkeypatch.setattr(main_distill, 'train_one_epoch', fake_epoch)
    monkeypatch.setattr(main_distill, 'end_epoch', lambda *a, **k: None)
    data = image_folder_factory(tmp_path / 'data', n_per_class=2)

    def run(*argv):
        seen.clear()
        main_distill.main(main_distill.get_args_parser().parse_args([
            '--data_path', str(data), '--output_dir', '', '--batch_size', '2', '--num_workers', '0', '--device', 'cpu',
            '--input_size', '32', *argv]))
        a = seen['args']
        return (a.epochs, a.warmup_epochs, a.blr, a.clip_grad, a.min_crop_scale, seen['betas'][1])

    assert run('--method', 'tinymim', '--model', 'vit_test', '--teacher_model', 'vit_test') == \
        (300, 15, 1.5e-4, None, 0.2, 0.95)
    assert run('--method', 'd2_swin', '--model', 'simmim_swin_demo_d2', '--teacher_model',
               'simmim_swin_demo_teacher') == (400, 10, 4e-4 / 8, 5.0, 0.67, 0.99)
    assert run('--method', 'd_mae', '--model', 'mae_vit_test', '--teacher_model', 'vit_test') == \
        (400, 40, 1.5e-4, None, 0.08, 0.95)
    assert run('--method', 'd2_swin', '--model', 'simmim_swin_demo_d2', '--teacher_model', 'simmim_swin_demo_teacher',
               '--epochs', '3', '--beta2', '0.9')[::5] == (3, 0.9)
    # D²-MAE: a 13-block student reconstructs from block 8 (MAE-Lite) unless told otherwise; block choices for the
    # attention target are D-MAE's and are refused rather than ignored
    run('--method', 'd2_mae', '--model', 'mae_vit_test', '--depth', '13', '--teacher_model', 'vit_test')
    assert seen['model'].decode_idx == 8
    with pytest.raises(ValueError, match='--distill_attn_idx'):
        run('--method', 'd2_mae', '--model', 'mae_vit_test', '--depth', '13', '--teacher_model', 'vit_test',
            '--distill_attn_idx', '5')


def test_tinymim_student_is_fine_tuned_with_its_pre_trained_head_count(tmp_path):
    """SPEC §3.3: the student's last block has the teacher's head count (here 3 heads of 10 dims in a 32-d, 2-head
    ViT), and fine-tuning must use it. The export records it; the shared loader rebuilds that block before loading
    (its [90, 32] qkv was silently dropped before), so the loaded block computes the distilled relations; a
    main_finetune run from the export, its resumption and --eval all build the same block."""
    from test_finetune import make_image_folder, read_log, tiny
    torch.manual_seed(0)
    student = models_vit.vit_test(num_classes=0)
    d = RelationDistiller(student, teacher(depth=3), teacher_block=2)
    out = tmp_path / 'distill'
    os.makedirs(out)
    main_distill.export_encoder(argparse.Namespace(output_dir=str(out), method='tinymim', model='vit_test',
                                                   input_size=32), d.model)
    enc = str(out / 'checkpoint-encoder.pth')
    assert torch.load(enc, weights_only=True)['args']['block_heads'] == [[1, 3]]
    ft = models_vit.vit_test(num_classes=10)
    info = load_pretrained(ft, enc)
    assert [b.attn.num_heads for b in ft.blocks] == [2, 3] and not info['mismatched']
    torch.testing.assert_close(ft.blocks[1].attn.qkv.weight, student.blocks[1].attn.qkv.weight)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        for got, want in zip(relations(ft.blocks[1], x), relations(student.blocks[1], x)):
            torch.testing.assert_close(got, want)

    root = make_image_folder(tmp_path / 'data', n_per_class=4)
    make_image_folder(tmp_path / 'v', n_per_class=2, seed=1)
    os.rename(tmp_path / 'v' / 'train', os.path.join(root, 'val'))
    run = tmp_path / 'ft'
    main_finetune.main(tiny(root, run, '--finetune', enc, '--epochs', '1'))
    main_finetune.main(tiny(root, run, '--finetune', enc, '--epochs', '2'))  # resumes: strict load of a [90, 32] qkv
    last = torch.load(run / 'checkpoint-last.pth', weights_only=True)
    assert [r['epoch'] for r in read_log(run)] == [0, 1] and last['args']['block_heads'] == [[1, 3]]
    assert last['model']['blocks.1.attn.qkv.weight'].shape == (90, 32)
    ev = main_finetune.main(tiny(root, tmp_path / 'ev', '--eval', '--resume', str(run / 'checkpoint-last.pth')))
    assert 0.0 <= ev['acc1'] <= 100.0
