"""benchmark.py: the official-style baseline computes what models_mae computes (so the speed comparison is fair),
and the distillation configurations time main_distill's real step with a frozen teacher."""
import torch

import benchmark
import masking
import models_mae


def _cfg(spec):
    args = benchmark.get_args_parser().parse_args(['--model', 'mae_vit_test', '--input_size', '32', '--batch_size',
                                                   '4', '--teacher', 'vit_test', '--device', 'cpu'])
    return benchmark.make_config(args, spec)


def test_baseline_step_equals_ours_given_the_same_noise():
    torch.manual_seed(0)
    mae = models_mae.create_model('mae_vit_test', img_size=32, norm_pix_loss=True)
    imgs = torch.randn(4, 3, 32, 32)
    noise = masking.random_noise(4, mae.patch_embed.num_patches)
    loss, pred, mask = mae(imgs, mask_ratio=0.75, noise=noise)
    b_loss, b_pred, b_mask = benchmark.OfficialStyleMAE(mae)(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, b_mask)
    assert torch.allclose(pred, b_pred, atol=1e-5)
    assert torch.allclose(loss, b_loss, atol=1e-6)


def test_distill_bench_trains_the_student_only():
    for impl in ('d_mae', 'd2_mae'):
        bench = benchmark.Bench(_cfg(f'impl={impl}'))
        teacher = bench.net.teacher[0]
        t_before = [p.clone() for p in teacher.parameters()]
        s_before = [p.clone() for p in bench.net.model.parameters()]
        bench.step()
        assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(s_before, bench.net.model.parameters()))
        assert len(bench.net.model.blocks) == len(teacher.blocks) + (impl == 'd2_mae')


def test_flop_count_matches_the_vit_formula():
    """The MFU numerator: a fine-tune step's counted FLOPs equal the hand count for a ViT (matmuls 2·m·n·k, attention
    2·N²·D for q·kᵀ and again for ·v; backward twice the forward, except the patch conv whose input needs no
    gradient), so attention is counted too."""
    bench = benchmark.Bench(_cfg('impl=finetune,model=vit_test'))
    vit = bench.net
    D, depth, B = vit.embed_dim, len(vit.blocks), 4
    L = vit.patch_embed.num_patches
    N, p = L + 1, vit.patch_embed.patch_size[0]
    hidden = vit.blocks[0].mlp.fc1.out_features
    block = 2 * N * D * (3 * D + D + 2 * hidden) + 2 * 2 * N * N * D
    head = 2 * D * vit.head.out_features
    conv = 2 * L * 3 * p * p * D
    assert bench.count_flops() == B * (3 * (depth * block + head) + 2 * conv)
    assert all(p.grad is None for p in vit.parameters())  # counting leaves no gradients behind


def test_finetune_bench_step_trains_with_layer_decay():
    bench = benchmark.Bench(_cfg('impl=finetune,model=mae_vit_test'))  # the mae_ prefix is dropped
    assert type(bench.net).__name__ == 'VisionTransformer'
    scales = sorted({g['lr_scale'] for g in bench.opt.param_groups})
    assert scales[-1] == 1.0 and scales[0] < 0.85 ** len(bench.net.blocks)  # patch embed: the deepest decay
    before = [p.clone() for p in bench.net.parameters()]
    bench.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, bench.net.parameters()))


def test_suite_covers_every_recipe_and_builds_on_cpu():
    args = benchmark.get_args_parser().parse_args(['--device', 'cpu'])
    specs = benchmark.suite(args, torch.device('cpu'))
    impls = {dict(kv.split('=') for kv in s.split(','))['impl'] for s in specs}
    assert impls == set(benchmark.IMPLS)
    models = ' '.join(specs)
    assert all(m in models for m in ('mae_vit_tiny', 'mae_vit_small', 'mae_vit_base', 'mae_swin_tiny',
                                      'simmim_swin_tiny', 'finetune,model=vit_base'))
    for s in specs:  # every suite entry is a valid configuration
        benchmark.make_config(args, s)


def test_compile_mode_key_reaches_torch_compile_and_the_result(monkeypatch):
    """compile_mode=... is handed to torch.compile and reported; an unknown mode is refused, naming the key."""
    calls = []
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: calls.append(kw) or m)
    bench = benchmark.Bench(_cfg('compile=1,compile_mode=reduce-overhead'))
    assert calls == [{'mode': 'reduce-overhead'}]
    bench.times = [0.1]
    assert bench.result()['compile_mode'] == 'reduce-overhead'
    plain = benchmark.Bench(_cfg(''))
    plain.times = [0.1]
    assert 'compile_mode' not in plain.result() and len(calls) == 1
    try:
        _cfg('compile=1,compile_mode=fastest')
    except ValueError as e:
        assert 'compile_mode' in str(e)
    else:
        raise AssertionError('an unknown compile_mode was accepted')


def test_profile_breakdown_splits_gemms_attention_and_the_rest():
    """--profile: the GEMM and attention FLOPs add up to the step's count; GEMMs and attention take time and none of
    their ops is listed among the others."""
    bench = benchmark.Bench(_cfg(''))
    bench.step()
    p = benchmark.profile_breakdown(bench, 2)
    total = bench.count_flops() / 1e9
    assert p['gemm_gflop'] > 0 and p['attention_gflop'] > 0
    assert abs(p['gemm_gflop'] + p['attention_gflop'] + p['other_gflop'] - total) <= 2e-4
    assert p['other_gflop'] == 0  # a ViT's patch embedding is a Linear over the flattened patches here
    assert p['gemm_ms'] > 0 and p['attention_ms'] > 0 and p['other_ms'] > 0
    assert not any(k in benchmark.GEMM_OPS or benchmark.is_attention(k) for k in p['top_other_ms'])
    assert benchmark.is_attention('aten::_scaled_dot_product_flash_attention_for_cpu_backward')
