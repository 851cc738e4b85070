"""models_hiera: timm's Hiera as encoder, MAE with mask units (ratio, unit layout, order), attention logits, the
shared loader into the fine-tune classifier, D-MAE on Hiera (the teacher sees the student's visible units), and 2-epoch
demo runs of main_pretrain / main_distill / main_finetune."""
import json
import os

import pytest
import timm
import torch

import main_distill
import main_finetune
import main_pretrain
import models_hiera
from util.lr_decay import param_groups_lrd
from util.pretrained import load_pretrained


def params_without_grad(module):
    return [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]


@pytest.mark.parametrize('name', ['hiera_test', 'hiera_demo', 'mae_hiera_test', 'mae_hiera_demo'])
def test_factory_forward_backward_every_param_gets_a_gradient(name):
    torch.manual_seed(0)
    model = models_hiera.create_model(name)
    imgs = torch.randn(2, 3, 32, 32)
    if name.startswith('mae'):
        loss = model(imgs)[0]
    else:  # timm zero-inits the head, which would stop every gradient at the first step
        torch.nn.init.normal_(model.head.fc.weight, std=0.02)
        loss = model(imgs).logsumexp(-1).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert not params_without_grad(model)


def test_hiera_tiny_is_timms_and_the_mae_encoder_has_its_keys():
    """Hiera-T = timm's hiera_tiny_224 (96-d, stages 1-2-7-2, heads 1-2-4-8, ~28M); MAE Hiera-T: 7x7 units of 8x8
    tokens (32 px), pooled twice (2x2 tokens per unit, 16-px targets), encoder keys = the classifier's minus fc."""
    with torch.device('meta'):
        ours = models_hiera.create_model('hiera_tiny')
        theirs = timm.create_model('hiera_tiny_224', pretrained=False)
        mae = models_hiera.create_model('mae_hiera_tiny')
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert [ours.blocks[e].attn.heads for e in ours.stage_ends] == [1, 2, 4, 8]
    assert [ours.blocks[e].dim_out for e in ours.stage_ends] == [96, 192, 384, 768]
    assert 27e6 < sum(p.numel() for p in ours.parameters()) < 29e6
    assert mae.mask_spatial_shape == [7, 7] and mae.unit_tokens == 2 and mae.pred_stride == 16
    enc = {k: v.shape for k, v in models_hiera.encoder_state_dict(mae).items()}
    assert enc == {k: v.shape for k, v in ours.state_dict().items() if not k.startswith('head.fc')}


def test_factories_merge_presets_and_reject_unknown_names():
    m = models_hiera.mae_hiera_test(decoder_embed_dim=32, embed_dim=8)
    assert m.decoder_embed.out_features == 32 and m.patch_embed.proj.out_channels == 8
    assert models_hiera.hiera_test(num_classes=3).head.fc.out_features == 3
    with pytest.raises(ValueError, match='valid names'):
        models_hiera.create_model('hiera_nope')
    with pytest.raises(ValueError, match='mask_unit_size'):
        models_hiera.mae_hiera_test(mask_unit_size=(8, 8))


@pytest.mark.parametrize('ratio', [0.4, 0.6, 0.75])
def test_mask_units_keep_the_configured_ratio_and_are_constant_per_unit(ratio):
    """mae_hiera_test has 4x4 units: each sample keeps int(16 * (1 - ratio)) of them, at its own positions; the mask
    on the token grid (what the loss uses) is constant inside every unit; the encoder sees the kept units only."""
    torch.manual_seed(0)
    model = models_hiera.mae_hiera_test()
    imgs = torch.randn(8, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=ratio, generator=torch.Generator().manual_seed(1))
    keep = int(16 * (1 - ratio))
    assert mask.shape == (8, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.sum(1) == 16 - keep).all()
    assert len({tuple(m.tolist()) for m in mask}) > 1  # per-sample masks
    t = model.unit_tokens
    tokens = model.token_mask(mask).view(8, 4, t, 4, t)
    assert torch.equal(tokens, tokens[:, :, :1, :, :1].expand_as(tokens))  # constant inside each unit
    assert torch.equal(tokens[:, :, 0, :, 0].reshape(8, 16), mask)
    latent, _ = model.forward_encoder(imgs, mask)
    assert latent.shape[:2] == (8, keep)
    # the same mask again gives the same loss (reproducible); a different one does not
    assert torch.equal(model(imgs, mask=mask)[0], loss)
    assert model(imgs, mask=mask.flip(1))[0] != loss
    uneven = mask.clone()
    uneven[0, mask[0].argmin()] = 1.0
    with pytest.raises(ValueError, match='same number of units'):
        model(imgs, mask=uneven)
    with torch.device('meta'):  # MAE-Lite's Hiera-T: 49 units, 0.4 removed -> 29 kept
        tiny = models_hiera.create_model('mae_hiera_tiny')
    assert ((1 - tiny.random_unit_mask(3, 0.4)).sum(1) == 29).all()


def test_visible_units_are_placed_back_in_their_own_unit():
    """timm keeps the visible units in ascending unit order: with the removed units' pixels zeroed, the first stage
    (mask-unit attention only) gives each visible unit the features the full image gives that unit. `place_units`
    puts unit features back where timm's own spatial re-roll has them."""
    torch.manual_seed(0)
    model = models_hiera.mae_hiera_test().eval()
    imgs = torch.randn(2, 3, 32, 32)
    mask = model.random_unit_mask(2, 0.5, generator=torch.Generator().manual_seed(0))
    px = mask.view(2, 1, 4, 1, 4, 1).expand(2, 1, 4, 8, 4, 8).reshape(2, 1, 32, 32)
    imgs = imgs * (1 - px)
    with torch.no_grad():
        part, _ = models_hiera.encode(model, imgs, mask == 0)
        full, _ = models_hiera.encode(model, imgs, torch.ones(2, 16, dtype=torch.bool))
        kept = full[0][mask == 0].view(part[0].shape)  # [N, K, u, u, C], ascending unit order
        torch.testing.assert_close(part[0], kept)
        grid = model.forward_features(imgs, return_intermediates=True)[1][-1]  # [N, h, w, C] spatial
        placed = model.place_units(full[-1], torch.zeros(2, 16), torch.zeros(grid.shape[-1]))
        torch.testing.assert_close(placed, grid.flatten(1, 2))
        fill = torch.full((grid.shape[-1],), 7.0)
        placed = model.place_units(part[-1], mask, fill).view(2, 4, 2, 4, 2, -1)  # [N, gh, t, gw, t, C]
        removed = mask.view(2, 4, 1, 4, 1, 1).expand_as(placed).bool()
        assert (placed[removed] == 7.0).all() and not (placed[~removed] == 7.0).any()


def test_encode_equals_timms_masked_forward_features():
    """`encode` drops the removed units by a gather of a known count; timm drops them by a boolean index. Every
    stage's output must be the same, for a random mask with and without the count given, and for a mask whose
    visible units are not in any sorted order of their ids (rows differ)."""
    torch.manual_seed(0)
    model = models_hiera.mae_hiera_test().eval()
    imgs = torch.randn(3, 3, 32, 32)
    mask = model.random_unit_mask(3, 0.75, generator=torch.Generator().manual_seed(1))  # 4 of 16 units visible
    assert not (mask[0] == mask[1]).all()
    with torch.no_grad():
        _, want = model.forward_features(imgs, mask=mask == 0, return_intermediates=True)
        for num_keep in (4, None):
            got, _ = models_hiera.encode(model, imgs, mask == 0, num_keep=num_keep)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_attention_logits_are_the_blocks_own():
    """softmax(logits) @ v through the projection reproduces each block's attention output, for every kind of
    block of hiera_test: mask-unit attention without and with q pooling, global attention with q pooling."""
    torch.manual_seed(0)
    model = models_hiera.hiera_test().eval()
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    for i, kind in enumerate([(True, 1), (True, 4), (False, 4)]):
        blk, x = model.blocks[i], inputs[i]
        attn = blk.attn
        assert (attn.use_mask_unit_attn, attn.q_stride) == kind
        with torch.no_grad():
            logits = models_hiera.attention_logits(blk, x)
            nw = logits.shape[2] if attn.use_mask_unit_attn else 1
            qkv = attn.qkv(blk.norm1(x)).reshape(2, -1, nw, 3, attn.heads, attn.head_dim)  # [N, L/nW, nW, 3, H, hd]
            v = qkv[:, :, :, 2]  # [N, L/nW, nW, H, hd]
            v = v.permute(0, 3, 2, 1, 4)  # [N, H, nW, L/nW, hd]
            if not attn.use_mask_unit_attn:
                v = v.squeeze(2)
            out = logits.softmax(-1) @ v
            out = out.transpose(1, 3) if attn.use_mask_unit_attn else out.transpose(1, 2)
            torch.testing.assert_close(attn.proj(out.reshape(2, -1, attn.dim_out)), attn(blk.norm1(x)),
                                       atol=1e-5, rtol=1e-5)
    # global, 4 heads: 64 keys (16 units x 2x2 tokens), 16 pooled queries
    assert models_hiera.attention_logits(model.blocks[2], inputs[2]).shape == (2, 4, 16, 64)


def test_checkpoint_round_trips_through_the_shared_loader(tmp_path):
    """An MAE-Hiera checkpoint loads into the fine-tune classifier: every encoder weight equal, only head.fc missing
    (re-initialised), decoder / fusion convs / mask token dropped; into a 64 px model the position embedding is
    interpolated to the 32x32 token grid. Layer decay goes by block index."""
    torch.manual_seed(0)
    mae = models_hiera.mae_hiera_test()
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'model': mae.state_dict(), 'epoch': 1, 'args': {'model': 'mae_hiera_test'}}, path)
    ft = models_hiera.hiera_test()
    info = load_pretrained(ft, path)
    assert sorted(info['missing']) == ['head.fc.bias', 'head.fc.weight']
    assert not info['unexpected'] and not info['mismatched']
    enc = models_hiera.encoder_state_dict(mae)
    for k, v in ft.state_dict().items():
        if not k.startswith('head.fc'):
            assert torch.equal(v, enc[k]), k
    assert ft.head.fc.weight.abs().max() < 1e-3  # trunc-normal std 2e-5

    big = models_hiera.hiera_test(img_size=64)
    info = load_pretrained(big, path)
    assert sorted(info['missing']) == ['head.fc.bias', 'head.fc.weight'] and big.pos_embed.shape == (1, 1024, 16)
    torch.testing.assert_close(big.pos_embed.view(32, 32, 16)[::2, ::2].mean(), mae.pos_embed.mean(), atol=0.02,
                               rtol=0)

    d = 0.75
    groups = param_groups_lrd(ft, 0.05, d)
    of = {id(p): g for g in groups for p in g['params']}
    params = dict(ft.named_parameters())
    n = len(ft.blocks) + 1
    for name, layer_id in {'pos_embed': 0, 'patch_embed.proj.weight': 0, 'blocks.0.attn.qkv.weight': 1,
                           'blocks.2.mlp.fc1.weight': 3, 'head.norm.weight': n, 'head.fc.weight': n}.items():
        assert of[id(params[name])]['layer_id'] == layer_id, name
        assert of[id(params[name])]['lr_scale'] == pytest.approx(d ** (n - layer_id)), name
    assert of[id(params['pos_embed'])]['weight_decay'] == 0.0


def test_loaded_classifier_is_the_mae_encoder_plus_one_pooling(tmp_path):
    """After the shared loader, the classifier computes the MAE encoder's function on an unmasked image: the stages
    before its extra pooling give the MAE's per-unit outputs bit for bit, and its last stage equals the MAE encoder
    run with that pooling (a max over the q stride, no weights) switched on at the same block."""
    torch.manual_seed(0)
    mae = models_hiera.mae_hiera_test().eval()
    for p in mae.parameters():  # a trained-looking encoder, not timm's near-zero init
        p.data.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'model': mae.state_dict()}, path)
    ft = models_hiera.hiera_test().eval()
    load_pretrained(ft, path)
    imgs = torch.randn(2, 3, 32, 32)
    keep = torch.ones(2, mae.num_units, dtype=torch.bool)
    with torch.no_grad():
        want, _ = models_hiera.encode(mae, imgs, keep)  # every stage, [N, 16 units, u, u, C]
        x = ft.unroll(ft._pos_embed(ft.patch_embed(imgs)))  # [N, L, C], unrolled
        for i, blk in enumerate(ft.blocks[:ft.stage_ends[-2] + 1]):
            x = blk(x)
            if i in ft.stage_ends:
                s = ft.stage_ends.index(i)
                got = ft.reroll(x, i)  # [N, H_s, W_s, C], spatial
                u = want[s].shape[2]
                got = got.view(2, 4, u, 4, u, -1).transpose(2, 3).reshape(want[s].shape)  # [N, 16, u, u, C]
                torch.testing.assert_close(got, want[s], rtol=0, atol=0)
        pooled = mae.blocks[ft.stage_ends[-2] + 1]
        assert pooled.attn.q_stride == 1 and ft.blocks[ft.stage_ends[-2] + 1].attn.q_stride == 4
        pooled.attn.q_stride = 4
        y = mae.unroll(mae._pos_embed(mae.patch_embed(imgs)))
        for blk in mae.blocks:
            y = blk(y)
        torch.testing.assert_close(ft.forward_features(imgs), y, rtol=0, atol=0)


def test_distiller_teacher_sees_the_visible_units_only_and_gets_no_gradient():
    """D-MAE on Hiera: the teacher's patch embedding is given the student's keep mask and its blocks the visible
    tokens only, so noise in the removed units leaves its last-block input unchanged (noise in a visible unit does
    not); the teacher gets no gradient, is not a parameter or state of the distiller and stays in eval mode; the
    adapter maps 4 student heads to the teacher's 8."""
    torch.manual_seed(0)
    student = models_hiera.mae_hiera_test()
    teacher = models_hiera.create_teacher('hiera_test', num_heads=2).eval()
    d = models_hiera.HieraDistiller(student, teacher).train()
    assert d.adapters[0].in_channels == 4 and d.adapters[0].out_channels == 8
    seen = {}
    hooks = [teacher.patch_embed.register_forward_pre_hook(
                 lambda m, a, kw: seen.__setitem__('mask', kw.get('mask', a[1] if len(a) > 1 else None)),
                 with_kwargs=True),
             teacher.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__('tokens', a[0].shape[1])),
             teacher.blocks[-1].register_forward_pre_hook(lambda m, a: seen.__setitem__('last', a[0].clone()))]
    imgs = torch.randn(2, 3, 32, 32)
    mask = student.random_unit_mask(2, 0.4, generator=torch.Generator().manual_seed(0))  # 9 of 16 units kept
    loss, parts = d(imgs, mask=mask)
    assert torch.equal(seen['mask'].view(2, 16), mask == 0)
    assert seen['tokens'] == 9 * teacher.mu_size
    last = seen['last']
    px = mask.view(2, 1, 4, 1, 4, 1).expand(2, 1, 4, 8, 4, 8).reshape(2, 1, 32, 32)
    d(imgs + 5 * torch.randn_like(imgs) * px, mask=mask)
    torch.testing.assert_close(seen['last'], last)
    d(imgs + 5 * torch.randn_like(imgs) * (1 - px), mask=mask)
    assert not torch.allclose(seen['last'], last)
    for h in hooks:
        h.remove()

    assert parts['loss_attn'] > 0 and torch.isclose(loss, parts['loss_mae'] + parts['loss_attn'])
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert not any(k.startswith('teacher') for k in d.state_dict())
    assert {id(p) for p in d.parameters()} == {id(p) for p in student.parameters()} | {id(d.adapters[0].weight)}
    assert not params_without_grad(d)  # student and adapter


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny models, one thread

COMMON = ['--input_size', '32', '--batch_size', '64', '--num_workers', '0', '--device', 'cpu', '--print_freq', '100']


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def test_main_pretrain_and_finetune_hiera_on_the_demo(demo_dir, tmp_path):
    """2 demo epochs of MAE-Hiera through main_pretrain (mask ratio 0.4 by default) with a falling loss, then one
    fine-tune epoch of the classifier from its checkpoint through main_finetune."""
    out = str(tmp_path / 'pre')
    args = main_pretrain.get_args_parser().parse_args(['--model', 'mae_hiera_test', '--output_dir', out, '--epochs',
                                                       '2', '--warmup_epochs', '0', '--blr', '5e-3', *COMMON])
    model = main_pretrain.main(args)
    assert isinstance(model, models_hiera.MaskedAutoencoderHiera) and args.mask_ratio == 0.4
    rows = read_log(out)
    assert [r['epoch'] for r in rows] == [0, 1]
    assert rows[1]['train_loss'] < rows[0]['train_loss'] and all(0 < r['train_loss'] < 10 for r in rows)

    ft = main_finetune.main(main_finetune.get_args_parser().parse_args([
        '--model', 'hiera_test', '--finetune', os.path.join(out, 'checkpoint-last.pth'), '--output_dir',
        str(tmp_path / 'ft'), '--epochs', '1', '--warmup_epochs', '0', *COMMON]))
    assert 0.0 <= ft['acc1'] <= ft['acc5'] <= 100.0
    saved = torch.load(tmp_path / 'ft' / 'checkpoint-last.pth', weights_only=True)
    assert saved['model']['head.fc.weight'].shape == (10, 64) and isinstance(saved['args'], dict)
    with pytest.raises(ValueError, match='Hiera pools by average'):
        main_finetune.main(main_finetune.get_args_parser().parse_args([
            '--model', 'hiera_test', '--global_pool', 'token', '--output_dir', str(tmp_path / 'x'), *COMMON]))


def test_main_distill_hiera_falls_resumes_and_exports(demo_dir, tmp_path):
    """d_mae_hiera: 2 demo epochs (stopped after the first and rerun: auto-resume) with a falling loss; the
    checkpoint holds no teacher; the exported encoder loads strictly into the headless Hiera classifier."""
    out = str(tmp_path / 'dist')

    def run(*extra):
        args = main_distill.get_args_parser().parse_args([
            '--method', 'd_mae_hiera', '--model', 'mae_hiera_test', '--teacher_model', 'hiera_test', '--output_dir',
            out, '--epochs', '2', '--warmup_epochs', '0', '--blr', '5e-3', *COMMON, *extra])
        main_distill.main(args)
        return args
    run('--epochs', '1')
    args = run()
    assert args.mask_ratio == 0.4
    rows = read_log(out)
    assert [r['epoch'] for r in rows] == [0, 1]
    assert rows[1]['train_loss'] < rows[0]['train_loss']
    ckpt = torch.load(os.path.join(out, 'checkpoint-last.pth'), weights_only=True)
    assert not any(k.startswith('teacher') for k in ckpt['model']) and 'adapters.0.weight' in ckpt['model']
    enc = torch.load(os.path.join(out, 'checkpoint-encoder.pth'), weights_only=True)['model']
    model = models_hiera.hiera_test(num_classes=0)
    model.load_state_dict(enc, strict=True)
    assert torch.equal(model.blocks[0].attn.qkv.weight, ckpt['model']['model.blocks.0.attn.qkv.weight'])
