"""The shared training loop (util/engine.py): non-finite guard and skipped-image accounting."""
import argparse

import pytest
import torch

from util.engine import NonFiniteLossError, train_one_epoch


def _args(**kw):
    base = dict(accum_iter=1, clip_grad=None, print_freq=100, max_nonfinite=3, device='cpu', amp='none', lr=0.1,
                min_lr=0.0, warmup_epochs=0, epochs=1)
    return argparse.Namespace(**{**base, **kw})


def _loader(flags, n_bad=0):
    """One (images, targets, n_skipped) triple per flag; a target of 1 tells the step to make its loss NaN."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 4, generator=g), torch.full((2,), int(bad)), n_bad) for bad in flags]


def _step(model, images, targets):
    loss = (model(images) ** 2).mean()
    if targets[0] == 1:
        loss = loss * float('nan')
    return loss, {'aux': torch.tensor(1.0)}


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optimizer, {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_nonfinite_steps_are_skipped():
    """A NaN loss leaves the weights untouched and is counted in skipped_steps."""
    model, optimizer, before = _setup()
    stats = train_one_epoch(model, _step, _loader([True, True]), optimizer, 0, _args())
    assert stats['skipped_steps'] == 2
    assert _unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())  # the NaN gradient is not carried into the next step


def test_nonfinite_limit_raises():
    """max_nonfinite NaN steps in a row raise NonFiniteLossError, with the weights still untouched."""
    model, optimizer, before = _setup()
    seen = []
    step = lambda m, x, t: seen.append(1) or _step(m, x, t)  # noqa: E731
    with pytest.raises(NonFiniteLossError):
        train_one_epoch(model, step, _loader([True] * 5), optimizer, 0, _args(max_nonfinite=3))
    assert len(seen) == 3
    assert _unchanged(model, before)


def test_nonfinite_count_resets_after_a_good_step():
    """Only NaN steps *in a row* count toward the limit; good steps still update the weights."""
    model, optimizer, before = _setup()
    stats = train_one_epoch(model, _step, _loader([True, True, False, True, True]), optimizer, 0, _args())
    assert stats['skipped_steps'] == 4
    assert not _unchanged(model, before)
    assert stats['aux'] == 1.0


def test_good_epoch_updates_weights_and_counts_skipped_images():
    """A finite epoch steps the optimizer every iteration and sums the loader's skipped-image counts."""
    model, optimizer, before = _setup()
    stats = train_one_epoch(model, _step, _loader([False] * 4, n_bad=1), optimizer, 0, _args())
    assert stats['skipped_steps'] == 0 and stats['skipped_images'] == 4
    assert optimizer.state[model.weight]['step'] == 4
    assert not _unchanged(model, before)
    assert stats['loss'] > 0


def test_gradient_accumulation_steps_every_accum_iter():
    """With accum_iter=2 the optimizer steps once per two batches (and on the last, incomplete group)."""
    model, optimizer, _ = _setup()
    train_one_epoch(model, _step, _loader([False] * 5), optimizer, 0, _args(accum_iter=2))
    assert optimizer.state[model.weight]['step'] == 3


def test_fully_unreadable_batch_is_skipped_with_accumulation():
    """A batch whose images were all unreadable (empty tensors) is skipped and counted, also with accum_iter=2
    where it falls on the iteration that would set the learning rate."""
    model, optimizer, before = _setup()
    loader = [(torch.empty(0), torch.empty(0, dtype=torch.long), 2)] + _loader([False] * 3)
    stats = train_one_epoch(model, _step, loader, optimizer, 0, _args(accum_iter=2))
    assert stats['skipped_images'] == 2
    assert not _unchanged(model, before)


def test_skipped_nan_step_stays_out_of_the_epoch_means():
    """The logged epoch loss averages the steps taken: one skipped NaN step must not turn it into NaN."""
    model, optimizer, _ = _setup()
    losses = []

    def step(m, x, t):
        loss, metrics = _step(m, x, t)
        losses.append(loss.item())
        return loss, metrics

    stats = train_one_epoch(model, step, _loader([False, True, False]), optimizer, 0, _args())
    assert stats['skipped_steps'] == 1
    assert stats['loss'] == pytest.approx((losses[0] + losses[2]) / 2)


@pytest.mark.parametrize('accum_iter', [1, 2])
def test_logged_values_survive_a_step_that_reuses_its_output_buffers(accum_iter):
    """A CUDA-graph replay (--compile_mode reduce-overhead) writes every step's loss and metrics into the same
    buffers; the epoch means must still be those of each step's own values, with and without accumulation."""
    model, optimizer, _ = _setup()
    loss_buf, aux_buf, losses, auxes = torch.zeros(()), torch.zeros(()), [], []

    def step(m, x, t):
        loss = loss_buf.detach_().copy_((m(x) ** 2).mean())  # the returned loss is always the same storage
        aux_buf.copy_(x.sum())
        losses.append(loss.item())
        auxes.append(aux_buf.item())
        return loss, {'aux': aux_buf}

    stats = train_one_epoch(model, step, _loader([False] * 4), optimizer, 0, _args(accum_iter=accum_iter))
    assert len(set(losses)) == 4 and len(set(auxes)) == 4
    assert stats['loss'] == pytest.approx(sum(losses) / 4) and stats['aux'] == pytest.approx(sum(auxes) / 4)


def test_unreadable_batch_under_ddp_replays_the_last_batch_at_zero_weight(monkeypatch):
    """Under DDP an all-unreadable batch still runs forward and backward (the other ranks' all-reduce waits for it),
    on the last readable batch with zero weight: it is not logged, and a first batch with nothing readable is an
    error naming the cause."""
    from util import engine
    monkeypatch.setattr(engine.dist, 'is_dist', lambda: True)
    # one process stands for the group: no real collectives
    for name, fn in [('all_reduce_mean', float), ('all_reduce_sum', float), ('get_world_size', lambda: 1),
                     ('get_rank', lambda: 0)]:
        monkeypatch.setattr(engine.dist, name, fn)
    model, optimizer, _ = _setup()
    seen = []

    def step(m, x, t):
        seen.append(x)
        return _step(m, x, t)

    good = _loader([False, False])
    empty = (torch.empty(0), torch.empty(0, dtype=torch.long), 2)
    stats = train_one_epoch(model, step, [good[0], empty, good[1]], optimizer, 0, _args())
    assert len(seen) == 3 and torch.equal(seen[1], good[0][0])
    assert stats['skipped_images'] == 2
    # the replayed step contributed a zero gradient: the accumulated .grad of a 2-micro-step group equals the
    # good batch's own gradient
    model, optimizer, _ = _setup()
    loss, _ = _step(model, good[0][0], good[0][1])
    expected = torch.autograd.grad(loss / 2, model.weight)[0]
    captured = {}
    optimizer.step = lambda: captured.setdefault('grad', model.weight.grad.clone())
    train_one_epoch(model, _step, [good[0], empty], optimizer, 0, _args(accum_iter=2))
    assert torch.allclose(captured['grad'], expected)
    with pytest.raises(RuntimeError, match='no readable image'):
        train_one_epoch(model, _step, [empty] + good, optimizer, 0, _args())


def _fused_setup():
    model, _, before = _setup()
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True), before


def test_fused_optimizer_skips_nonfinite_steps_on_the_device():
    """The device-side skip (found_inf) leaves weights and Adam's step count untouched and keeps NaN out of the means."""
    model, optimizer, before = _fused_setup()
    stats = train_one_epoch(model, _step, _loader([True, True]), optimizer, 0, _args())
    assert stats['skipped_steps'] == 2 and _unchanged(model, before)
    assert all(float(s['step']) == 0 for s in optimizer.state.values())
    losses = []
    step = lambda m, x, t: losses.append(_step(m, x, t)) or losses[-1]  # noqa: E731
    stats = train_one_epoch(model, step, _loader([False, True, False]), optimizer, 0, _args())
    assert stats['skipped_steps'] == 1 and not _unchanged(model, before)
    assert stats['loss'] == pytest.approx((losses[0][0].item() + losses[2][0].item()) / 2)
    assert all(float(s['step']) == 2 for s in optimizer.state.values())


def test_fused_optimizer_aborts_at_the_next_check():
    """max_nonfinite in a row still aborts when the decision stays on the device; the check runs at the progress
    line, here the last iteration, and the weights are still untouched."""
    model, optimizer, before = _fused_setup()
    with pytest.raises(NonFiniteLossError, match='5 optimizer steps in a row'):
        train_one_epoch(model, _step, _loader([True] * 5), optimizer, 0, _args(max_nonfinite=3))
    assert _unchanged(model, before)
    # a run shorter than the limit between two checks is only counted
    stats = train_one_epoch(model, _step, _loader([True, True, False, True, False]), optimizer, 0,
                            _args(max_nonfinite=3))
    assert stats['skipped_steps'] == 3


def _host_reads(monkeypatch, fn):
    """Run fn() counting tensor-to-host reads made from Python (item, tolist, float, int, bool)."""
    count = [0]
    for name in ('item', 'tolist', '__float__', '__int__', '__bool__'):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            count[0] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    fn()
    monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize('fused', [True, False])
def test_host_reads_do_not_grow_with_the_epoch_when_fused(monkeypatch, fused):
    """With a fused optimizer the loop reads nothing back per step (reads happen at progress lines only); the plain
    optimizer needs one read per step for the skip decision."""
    def reads(n):
        model, _, _ = _setup()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
        step = lambda m, x, t: ((m(x) ** 2).mean(), {'aux': x.sum()})  # noqa: E731 (reads nothing itself)
        return _host_reads(monkeypatch, lambda: train_one_epoch(model, step, _loader([False] * n), optimizer, 0,
                                                                  _args(print_freq=1000)))
    short, long = reads(4), reads(12)
    if fused:
        assert long == short
    else:
        assert long - short >= 8
