"Tests of fsmis.learner: iteration training, loss decrease, schedule, checkpoints, exact resume, safe loading (CPU)."
import pickle, argparse
import pytest, torch, pandas as pd
from fsmis.data.phantom import toy_dls
from fsmis.learner import (adnet_learner, alpnet_learner, panet_learner, fit_iters, save_checkpoint,
                           load_checkpoint, read_checkpoint, list_checkpoints, load_model, IterTrainer)
from fsmis.models.adnet import ADNet

torch.set_num_threads(1)


def make(fac=adnet_learner, size=64, seed=0, path=None, **kw):
    torch.manual_seed(seed)
    return fac(toy_dls(1000, size), 'small', path=path, **kw)


def test_loss_falls_over_100_iterations(tmp_path):
    learn = make(path=tmp_path)
    fit_iters(learn, 100, progress=False)
    log = pd.DataFrame(learn.iter_log)
    assert learn.iteration == 100 and len(log) == 100 and list(log.iter) == list(range(1, 101))
    first, last = log.loss[:20].mean(), log.loss[-20:].mean()
    print(f"ADNet small 64px loss {first:.3f} -> {last:.3f}, dice {log.dice[:20].mean():.3f} -> {log.dice[-20:].mean():.3f}")
    assert last < first - 0.1
    assert {'seg', 'thresh', 'par', 'T', 'dice'} <= set(log.columns)
    assert log['T'].iloc[-1] != -10.0  # T is learned


@pytest.mark.parametrize('fac', [alpnet_learner, panet_learner])
def test_baselines_train(fac, tmp_path):
    learn = make(fac, size=48, path=tmp_path)
    fit_iters(learn, 60, progress=False)
    log = pd.DataFrame(learn.iter_log)
    assert log.loss[-15:].mean() < log.loss[:15].mean()


def test_resume_is_exact(tmp_path):
    "Interrupted at 50 and resumed == uninterrupted at 100 (weights and optimizer state, CPU, fixed seed)."
    a = make(size=32, path=tmp_path/'a'); fit_iters(a, 50, ckpt_every=25, keep=None, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path/'a'/'checkpoints')] == ['iter_0000025.pth', 'iter_0000050.pth']
    b = make(size=32, seed=123, path=tmp_path/'a')  # a fresh process would build everything anew
    fit_iters(b, 100, resume='last', progress=False)
    c = make(size=32, path=tmp_path/'c'); fit_iters(c, 100, progress=False)
    assert b.iteration == c.iteration == 100
    for (k, p), q in zip(b.model.state_dict().items(), c.model.state_dict().values()): assert torch.equal(p, q), k
    sb, sc = b.opt.state_dict()['state'], c.opt.state_dict()['state']
    assert all(torch.equal(sb[i]['momentum_buffer'], sc[i]['momentum_buffer']) for i in sc)
    # and the logged losses of iterations 51..100 agree
    assert [r['loss'] for r in b.iter_log] == [r['loss'] for r in c.iter_log[50:]]


def test_final_checkpoint(tmp_path):
    learn = make(size=32, path=tmp_path); fit_iters(learn, 7, ckpt_every=5, keep=None, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path/'checkpoints')] == ['iter_0000005.pth', 'iter_0000007.pth']


def test_fit_iters_continues(tmp_path):
    a = make(size=32, path=tmp_path); fit_iters(a, 10, progress=False); fit_iters(a, 15, progress=False)
    assert a.iteration == 15 and len(a.iter_log) == 15
    fit_iters(a, 15, progress=False); assert a.iteration == 15


def test_step_decay_schedule(tmp_path):
    for decay in (0.98, 0.95):
        learn = make(size=32, path=tmp_path, decay=decay, decay_every=4)
        fit_iters(learn, 9, progress=False)
        assert learn.opt.hypers[0]['lr'] == pytest.approx(1e-3 * decay ** 2)  # lr of iteration 9 (index 8)
    cb = IterTrainer(lr=1e-3, decay=0.98, decay_every=1000)
    assert cb.lr_at(999) == 1e-3 and cb.lr_at(49999) == pytest.approx(1e-3 * 0.98 ** 49)
    assert make(size=32).fsmis_schedule == {'lr': 1e-3, 'decay': 0.98, 'decay_every': 1000}  # paper default


def test_optimizer_is_papers_sgd():
    learn = make(size=32); learn.create_opt()
    g = learn.opt.opt.param_groups[0]
    assert isinstance(learn.opt.opt, torch.optim.SGD)
    assert (g['lr'], g['momentum'], g['weight_decay']) == (1e-3, 0.9, 5e-4)


def test_checkpoint_contents_weights_only(tmp_path):
    learn = make(size=32, path=tmp_path); fit_iters(learn, 3, progress=False)
    p = save_checkpoint(learn, tmp_path/'ck.pth')
    ck = torch.load(p, weights_only=True)
    assert ck['iteration'] == 3 and ck['model_kind'] == 'adnet' and set(ck['rng']) >= {'python', 'numpy', 'torch'}
    assert ck['schedule'] == {'lr': 1e-3, 'decay': 0.98, 'decay_every': 1000}  # the learner's schedule, also after the fit
    m = load_model(p, device='cpu')
    assert isinstance(m, ADNet) and not m.training and m.threshold == learn.model.threshold


def test_resume_restores_the_schedule(tmp_path):
    "A resumed run continues with the schedule it was trained with, whatever the new learner's defaults."
    learn = make(size=32, path=tmp_path); learn.fsmis_schedule = {'lr': 5e-3, 'decay': 0.5, 'decay_every': 2}
    fit_iters(learn, 3, ckpt_every=3, progress=False)
    ck = torch.load(list_checkpoints(tmp_path/'checkpoints')[-1], weights_only=True)
    assert ck['schedule'] == {'lr': 5e-3, 'decay': 0.5, 'decay_every': 2}
    fresh = make(size=32, path=tmp_path)
    with pytest.warns(UserWarning, match="checkpoint's schedule"): load_checkpoint(fresh, list_checkpoints(tmp_path/'checkpoints')[-1])
    assert fresh.fsmis_schedule == {'lr': 5e-3, 'decay': 0.5, 'decay_every': 2}


class Evil:
    "An arbitrary picklable object."
    def __reduce__(self): return (print, ('this would run code',))


def test_pickled_objects_refused(tmp_path):
    learn = make(size=32, path=tmp_path)
    p = save_checkpoint(learn, tmp_path/'ok.pth')
    ck = torch.load(p, weights_only=True); ck['extra'] = argparse.Namespace(a=1)
    torch.save(ck, tmp_path/'bad.pth')
    with pytest.raises(ValueError, match='weights_only=False'): read_checkpoint(tmp_path/'bad.pth')
    with pytest.raises(ValueError, match='weights_only=False'): load_checkpoint(learn, tmp_path/'bad.pth')
    with pytest.raises(ValueError, match='weights_only=False'): load_model(tmp_path/'bad.pth')
    torch.save({'model': Evil()}, tmp_path/'evil.pth')
    with pytest.raises(ValueError): read_checkpoint(tmp_path/'evil.pth')
    # explicit opt-in for a trusted file
    assert read_checkpoint(tmp_path/'bad.pth', weights_only=False)['extra'].a == 1
    with pytest.raises(FileNotFoundError): read_checkpoint(tmp_path/'missing.pth')


def test_ablation_learner_switches():
    learn = make(size=32, par=False, thresh=False)
    assert learn.model.par is False and learn.loss_func.par is False and learn.loss_func.thresh is False
    fit_iters(learn, 3, progress=False)
    assert set(learn.iter_log[-1]) >= {'seg'} and 'par' not in learn.iter_log[-1]


def test_fp16_needs_cuda():
    with pytest.raises(ValueError, match='CUDA'): make(size=32, precision='fp16')
    learn = make(size=32)
    assert not any(type(c).__name__ in ('MixedPrecision', 'CPUAutocast') for c in learn.cbs) and learn.precision == 'fp32'


def test_bf16_precision_runs_the_encoder_in_bf16_and_is_recorded(tmp_path):
    from fsmis.learner import CPUAutocast, read_checkpoint
    learn = make(size=32, path=tmp_path, precision='bf16')
    assert learn.precision == 'bf16' and any(isinstance(c, CPUAutocast) for c in learn.cbs)
    seen = []
    conv = next(m for m in learn.model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    h = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fit_iters(learn, 3, progress=False); h.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)  # the encoder's convolutions ran in bfloat16
    assert all(torch.isfinite(torch.tensor(r['loss'])) for r in learn.iter_log)
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())  # weights and optimiser stay float32
    assert read_checkpoint(save_checkpoint(learn, tmp_path/'a.pth'))['precision'] == 'bf16'
    fp = make(size=32, path=tmp_path/'b', precision='fp32'); seen.clear()
    h = next(m for m in fp.model.encoder.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fit_iters(fp, 1, progress=False); h.remove()
    assert seen and all(d == torch.float32 for d in seen)  # the check can fail


def test_progress_bar_runs(tmp_path, capsys):
    learn = make(size=32, path=tmp_path); fit_iters(learn, 5, progress=True)
    assert learn.iteration == 5


def test_resume_exact_with_episode_dls(tmp_path):
    "With fsmis.data.episodes (episode i of pass e seeded by (seed, e, i)): resume mid-pass, across a pass boundary."
    episodes = pytest.importorskip('fsmis.data.episodes'); io = pytest.importorskip('fsmis.data.datasets')
    ds = io.open_dataset('phantom', n_cases=2, seed=0, shape=(16, 64, 64))
    def mk(path):
        dls = episodes.episode_dls(ds, sampler='supervised', classes=[1, 4], size=48, n_episodes=7, seed=0, device='cpu')
        torch.manual_seed(0)
        return adnet_learner(dls, 'small', path=path)
    a = mk(tmp_path/'a'); fit_iters(a, 10, ckpt_every=10, progress=False)  # pass 2, 3 batches in
    ck = torch.load(list_checkpoints(tmp_path/'a'/'checkpoints')[-1], weights_only=True)
    assert ck['data']['pos'] == 3 and ck['data']['n_passes'] == 1
    b = mk(tmp_path/'a'); fit_iters(b, 20, resume='last', progress=False)
    c = mk(tmp_path/'c'); fit_iters(c, 20, progress=False)
    for (k, p), q in zip(b.model.state_dict().items(), c.model.state_dict().values()): assert torch.equal(p, q), k
    assert [r['loss'] for r in b.iter_log] == [r['loss'] for r in c.iter_log[10:]]


def test_get_preds():
    learn = make(size=32)
    probs, targs, dec = learn.get_preds(with_decoded=True)  # activation applied: query probabilities
    assert probs.shape == (8, 1, 2, 32, 32) and targs.shape == dec.shape == (8, 1, 32, 32)
    torch.testing.assert_close(probs.sum(2), torch.ones(8, 1, 32, 32))
    out, _, losses = learn.get_preds(with_loss=True)  # with_loss: fastai leaves the raw output dicts
    assert losses.shape == (8,) and out['qry'].shape == (8, 1, 2, 32, 32) and out['T'].shape == (8,)
