"Tests of fsmis.pretrain.densecl: no label read, exact resume, accumulation, queue rule, shuffle-BN, two-process training, weights file, validation (CPU)."
import math, os, socket, warnings
from pathlib import Path
import numpy as np
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import nibabel
from fastai.callback.core import Callback
from fsmis.data.datasets import open_dataset
from fsmis.data.phantom import PhantomDataset
from fsmis.learner import read_checkpoint, list_checkpoints
from fsmis.models.encoders import make_encoder
from fsmis.models.adnet import ADNet
from fsmis.models.alpnet import ALPNet, PANet
from fsmis.pretrain.densecl import (pretrain_densecl, unlabeled_slices, body_fractions, dense_positives, info_nce, DenseCL,
                                    DenseCLLoss, densecl_dls, densecl_learner, fit_densecl, read_encoder_meta, SliceDL, ViewPairs,
                                    shuffle_groups, queue_length, densecl_lr, has_batchnorm, in_subbatches)

torch.set_num_threads(1)
KW = dict(size=32, bs=4, queue=16, grid=4, progress=False, device='cpu')  # queue = the 16 slices of PH() (the queue rule)


def PH(): return PhantomDataset(2, shape=(8, 48, 48))  # 16 small slices, made in memory in ~0.1 s


def _tensors(o):
    "Every tensor in a nested dict/list, in order."
    if torch.is_tensor(o): return [o]
    if isinstance(o, dict): return [t for k in sorted(o, key=str) for t in _tensors(o[k])]
    if isinstance(o, (list, tuple)): return [t for x in o for t in _tensors(x)]
    return []


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "Two phantom cases as image_/label_ NIfTI files; the label files are then replaced by garbage bytes."
    d = tmp_path_factory.mktemp('scans')
    PhantomDataset(2, shape=(8, 48, 48)).to_folder(d)
    for p in d.glob('label_*'): p.write_bytes(b'not a nifti file')
    return d


@pytest.fixture
def spy_loads(monkeypatch):
    opened, real = [], nibabel.load
    def load(f, *a, **k): opened.append(os.path.basename(str(f))); return real(f, *a, **k)
    monkeypatch.setattr(nibabel, 'load', load)
    return opened


@pytest.mark.parametrize('source', ['folder', 'dataset', 'list'])
def test_label_files_are_never_opened(folder, spy_loads, tmp_path, source):
    "The labels are garbage: opening one would fail; the spy proves that only image files were loaded."
    data = {'folder': folder, 'dataset': open_dataset(folder, classes={1: 'liver'}),
            'list': [folder/'image_1.nii.gz', folder/'image_2.nii.gz']}[source]
    out = pretrain_densecl(data, steps=2, out=tmp_path/'enc.pth', **KW)
    assert sorted(spy_loads) == ['image_1.nii.gz', 'image_2.nii.gz']
    assert read_encoder_meta(out)['n_slices'] == 16


def test_almost_empty_slices_are_skipped():
    vol = np.random.rand(6, 32, 32).astype(np.float32) * 0.01
    vol[2:, 8:24, 8:24] = 5.  # body in slices 2..5 only (25 % of each), slices 0, 1 noise
    vol[1, :2, :2] = 5.  # a sliver: 4 of 1024 pixels
    fr = body_fractions(vol)
    assert (fr[:2] < 0.05).all() and (fr[2:] > 0.2).all()
    from fsmis.pretrain.densecl import SliceSet
    ss = SliceSet([vol], ['v'])
    assert ss.index == [(0, 2), (0, 3), (0, 4), (0, 5)] and ss.n_skipped == 2
    with pytest.raises(ValueError, match='min_body'): SliceSet([vol * 0 + np.random.rand(6, 32, 32)], ['v'], min_body=0.99)


class Interrupt(Callback):
    "Simulates a killed run: raises KeyboardInterrupt after the step `at` (after its checkpoint was written)."
    order = 99
    def __init__(self, at): self.at = at
    def after_batch(self):
        if self.training and self.learn.iteration == self.at: raise KeyboardInterrupt


def test_resume_is_exact(tmp_path):
    "Killed at step 4 of 8 and resumed == uninterrupted: weights, key encoder, queues, optimizer, and the weights file."
    kw = dict(KW, steps=8, ckpt_every=2)
    a = tmp_path/'a'/'enc.pth'
    with pytest.raises(KeyboardInterrupt): pretrain_densecl(PH(), out=a, cbs=[Interrupt(4)], **kw)
    assert not a.exists() and [p.name for p in list_checkpoints(tmp_path/'a'/'enc_checkpoints')] == ['iter_0000002.pth', 'iter_0000004.pth']
    pretrain_densecl(PH(), out=a, resume='last', **kw)
    b = pretrain_densecl(PH(), out=tmp_path/'b'/'enc.pth', **kw)
    ca, cb = (read_checkpoint(list_checkpoints(p.parent/'enc_checkpoints')[-1]) for p in (a, b))
    assert ca['iteration'] == cb['iteration'] == 8
    diff = [k for k in cb['model'] if not torch.equal(ca['model'][k], cb['model'][k])]
    assert not diff, diff
    assert {'queue_g', 'queue_d', 'queue_ptr', 'n_steps'} <= set(cb['model']) and any(k.startswith('encoder_k.') for k in cb['model'])
    assert not torch.equal(cb['model']['encoder_k.proj.weight'], cb['model']['encoder.proj.weight'])  # the key encoder is its own state
    oa, ob = _tensors(ca['opt']), _tensors(cb['opt'])
    assert len(oa) == len(ob) > 0 and all(torch.equal(x, y) for x, y in zip(oa, ob))  # SGD momentum buffers
    wa, wb = (torch.load(p, weights_only=True) for p in (a, b))
    assert all(torch.equal(wa['state_dict'][k], wb['state_dict'][k]) for k in wb['state_dict'])
    assert wa['meta']['resumed_from'].endswith('last') or 'iter_' in wa['meta']['resumed_from']
    # without the resume the run would differ: a fresh run with another seed does
    c = pretrain_densecl(PH(), out=tmp_path/'c'/'enc.pth', **{**kw, 'seed': 1})
    assert not torch.equal(torch.load(c, weights_only=True)['state_dict']['proj.weight'], wb['state_dict']['proj.weight'])


def test_weights_file_loads_into_every_few_shot_model(tmp_path):
    out = pretrain_densecl(PH(), 'small', steps=3, out=tmp_path/'w.pth', **KW)
    sd = torch.load(out, weights_only=True)
    assert set(sd) == {'state_dict', 'meta'}
    meta = sd['meta']
    assert meta['format'] == 'fsmis-encoder-weights/1' and meta['encoder'] == 'small' and meta['steps'] == 3
    assert meta['settings']['lam'] == 0.5 and meta['settings']['tau'] == 0.2 and meta['settings']['m'] == 0.999
    assert meta['data'] and meta['view_size'] == 32
    for M in (ADNet, ALPNet, PANet):
        enc = M('small', weights=out).encoder
        assert all(torch.equal(enc.state_dict()[k], v) for k, v in sd['state_dict'].items()), M.__name__
    assert not torch.equal(make_encoder('small').proj.weight, sd['state_dict']['proj.weight'])


def test_resnet18_weights_file(tmp_path):
    "A ResNet encoder (batch norm, stride 8) pretrains and loads too."
    out = pretrain_densecl(PH(), 'resnet18', steps=1, out=tmp_path/'r18.pth', accum=2, **{**KW, 'grid': 4})
    st = read_encoder_meta(out)['settings']
    assert (st['shuffle_bn'], st['accum'], st['bs'], st['total_bs']) == (2, 2, 4, 8)  # batch norm in one process: shuffle-BN on
    enc = make_encoder('resnet18', weights=out)
    assert torch.equal(enc.proj.weight, torch.load(out, weights_only=True)['state_dict']['proj.weight'])


@pytest.mark.parametrize('kw,err,msg', [
    (dict(steps=0), ValueError, 'steps='), (dict(steps=2.5), ValueError, 'steps='), (dict(steps=2, minutes=1), ValueError, 'steps and minutes'),
    (dict(), ValueError, 'steps or minutes'), (dict(minutes=-1), ValueError, 'minutes='), (dict(steps=2, encoder='vgg'), ValueError, 'encoder='),
    (dict(steps=2, lam=1.5), ValueError, 'lam='), (dict(steps=2, bs=0), ValueError, 'bs='), (dict(steps=2, grid=64), ValueError, 'grid='),
    (dict(steps=2, resume='/nonexistent/ck.pth'), FileNotFoundError, '/nonexistent/ck.pth'),
    (dict(steps=2, resume='last'), FileNotFoundError, 'resume='), (dict(steps=2, weights='/nonexistent/w.pth'), FileNotFoundError, 'w.pth'),
    (dict(steps=2, data='/nonexistent/scans'), FileNotFoundError, '/nonexistent/scans'),
    (dict(steps=2, bs=10_000), ValueError, 'bs='),
    (dict(steps=2, accum=0), ValueError, 'accum='),
    (dict(steps=2, shuffle_bn=3), ValueError, 'shuffle_bn='),
])
def test_arguments_are_validated(tmp_path, kw, err, msg):
    kw = {'data': PH(), 'out': tmp_path/'x.pth', **{k: v for k, v in KW.items() if k not in kw}, **kw}
    with pytest.raises(err, match=msg.replace('(', r'\(')): pretrain_densecl(**kw)
    assert not (tmp_path/'x.pth').exists()


def test_out_is_a_folder(tmp_path):
    with pytest.raises(ValueError, match='out='): pretrain_densecl(PH(), steps=1, out=tmp_path, **KW)


def test_loss_terms_lambda_and_warmup(tmp_path):
    p, n = torch.randn(6), torch.randn(6, 9)
    torch.testing.assert_close(info_nce(p, n), F.cross_entropy(torch.cat([p[:, None], n], 1), torch.zeros(6, dtype=torch.long)))
    torch.manual_seed(0)
    sl = unlabeled_slices(PhantomDataset(1, shape=(8, 48, 48)))
    learn = densecl_learner(densecl_dls(sl, 32, bs=4, device='cpu'), 'small', queue=8, grid=4, warmup=3, path=tmp_path)
    fit_densecl(learn, 5, progress=False)
    lams = [r['lam'] for r in learn.iter_log]
    assert lams == [0., 0., 0., 0.5, 0.5]
    for r in learn.iter_log: assert math.isclose(r['loss'], (1 - r['lam']) * r['global'] + r['lam'] * r['dense'], rel_tol=1e-5)
    lrs = [r['lr'] for r in learn.iter_log]  # cosine from the default lr = 0.0375 x 4 / 256 (DenseMP's rule)
    assert lrs == pytest.approx([0.0375 * 4 / 256 * 0.5 * (1 + math.cos(math.pi * t / 5)) for t in range(5)])
    assert learn.opt.hypers[0]['wd'] == 1e-4 and learn.opt.hypers[0]['mom'] == 0.9


def test_lambda_zero_trains_global_only(tmp_path):
    "lam = 0: the dense head receives no gradient (the MoCo v2 baseline)."
    torch.manual_seed(0)
    sl = unlabeled_slices(PhantomDataset(1, shape=(8, 48, 48)))
    learn = densecl_learner(densecl_dls(sl, 32, bs=4, device='cpu'), 'small', lam=0., queue=8, grid=4, path=tmp_path)
    w0 = learn.model.head_d[2].weight.clone(); g0 = learn.model.head_g[4].weight.clone()
    fit_densecl(learn, 2, progress=False)
    m = learn.model
    assert not torch.equal(m.head_g[4].weight, g0)
    torch.testing.assert_close(m.head_d[2].weight, w0 * (1 - 0.0375 * 4 / 256 * 1e-4) ** 2, rtol=0, atol=1e-7)  # weight decay only


def test_dense_positive_is_most_similar_backbone_cell():
    torch.manual_seed(0)
    f = torch.randn(2, 8, 6, 6)
    fk = torch.flip(f, dims=(3,)) * 3.0  # a mirrored, rescaled copy: cosine ignores the scale
    idx = dense_positives(f, fk)
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing='ij')
    assert torch.equal(idx[0], (i * 6 + (5 - j)).flatten()) and torch.equal(idx[1], idx[0])


def test_queue_ring_buffer_and_momentum():
    torch.manual_seed(0)
    m = DenseCL('small', queue=10, grid=4)
    for step in range(3):
        kg, kd = torch.full((4, 128), float(step)), torch.full((4, 128), -float(step))
        m.enqueue(kg, kd)
    assert int(m.queue_ptr) == 2  # 12 keys into a ring of 10
    assert m.queue_g[0, :2].tolist() == [2., 2.] and m.queue_g[0, 2:4].tolist() == [0., 0.] and m.queue_g[0, 8:].tolist() == [2., 2.]
    assert m.queue_d[0, 9].item() == -2.
    with torch.no_grad():
        for p in m.query_params(): p.add_(1.)
    k0 = [p.clone() for p in m.key_params()]
    m.momentum_update()
    for pk, pk0, pq in zip(m.key_params(), k0, m.query_params()): torch.testing.assert_close(pk, 0.999 * pk0 + 0.001 * pq)


def test_minutes_budget_fixes_the_schedule(tmp_path):
    out = pretrain_densecl(PH(), steps=None, minutes=0.05, out=tmp_path/'m.pth', **KW)
    meta = read_encoder_meta(out)
    total = meta['settings']['total_steps']
    assert total >= 5 and 1 <= meta['steps'] <= total
    ck = read_checkpoint(list_checkpoints(tmp_path/'m_checkpoints')[-1])
    assert ck['model_config']['total_steps'] == total  # a resumed run keeps the same cosine length


def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


class Dump(Callback):
    "Test probe: records the slice indices each rank trained on and saves its final state (outside the run's folder)."
    def __init__(self, path): self.path, self.seen = path, []
    def after_batch(self):
        if self.training: self.seen += self.yb[0].tolist()
    def after_fit(self):
        m = self.learn.model
        torch.save({'state': {k: v.clone() for k, v in m.state_dict().items()}, 'seen': self.seen}, self.path)


def _worker(rank, world, port, out, probe, kw=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        pretrain_densecl(PH(), 'small', steps=3, out=out, ckpt_every=2, cbs=[Dump(f"{probe}/rank{rank}.pt")], **{**KW, **(kw or {})})
    finally:
        if dist.is_initialized(): dist.destroy_process_group()


def test_two_processes_gloo(tmp_path):
    "2 ranks on gloo: identical weights, key encoders and queues after 3 steps; disjoint data; only rank 0 writes files."
    import torch.multiprocessing as mp
    (tmp_path/'run').mkdir(); (tmp_path/'probe').mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path/'run'/'enc.pth'), str(tmp_path/'probe')), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path/'probe'/f'rank{r}.pt', weights_only=True) for r in (0, 1))
    diff = [k for k in r0['state'] if not torch.equal(r0['state'][k], r1['state'][k])]
    assert not diff, diff
    s = r0['state']
    assert int(s['queue_ptr']) == 3 * 4 * 2 % 16  # keys of both ranks enqueued, every step (a ring of 16, the slices)
    assert len(r0['seen']) == 12 and not set(r0['seen'][:8]) & set(r1['seen'][:8])  # one pass (2 steps): each rank its own slices
    # queue columns are the gathered keys in rank order: the newest 8 differ (two ranks' keys)
    assert torch.linalg.matrix_rank(s['queue_g'][:, 0:8]) > 1
    files = sorted(str(p.relative_to(tmp_path/'run')) for p in (tmp_path/'run').rglob('*'))
    assert files == ['enc.pth', 'enc_checkpoints', 'enc_checkpoints/iter_0000002.csv', 'enc_checkpoints/iter_0000002.pth', 'enc_checkpoints/iter_0000003.csv', 'enc_checkpoints/iter_0000003.pth']  # each checkpoint with its log
    ck = read_checkpoint(tmp_path/'run'/'enc_checkpoints'/'iter_0000003.pth')
    assert all(torch.equal(ck['model'][k], s[k]) for k in s)
    assert read_encoder_meta(tmp_path/'run'/'enc.pth')['settings']['world'] == 2


# ---------------------------------------------------------------- gradient accumulation, queue rule, shuffle-BN
def _learner(bs, accum=1, queue=16, encoder='small', path=None, **kw):
    torch.manual_seed(0)
    sl = unlabeled_slices(PH())
    return densecl_learner(densecl_dls(sl, 32, bs=bs * accum, device='cpu'), encoder, queue=queue, grid=4, accum=accum, path=path, **kw)


def test_accumulation_is_the_big_batch(tmp_path):
    "accum 2 x 2 pairs == 4 pairs per step (a GroupNorm encoder: no batch statistics): same weights, key encoder, queues, lr, losses."
    a, b = (fit_densecl(_learner(bs, acc, path=tmp_path/str(acc), lr=lr), 3, progress=False) for bs, acc, lr in [(4, 1, 0.3), (2, 2, 0.3)])
    c = fit_densecl(_learner(2, 1, path=tmp_path/'c', lr=0.3), 3, progress=False)  # 2 pairs per step: another run
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    for k in sa:
        if k != 'n_steps': torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=2e-5, msg=lambda m: f"{k}: {m}")
    assert (sa['encoder.proj.weight'] - sc['encoder.proj.weight']).abs().max() > 1e-3  # the check can fail
    assert (a.iteration, b.iteration, len(b.iter_log)) == (3, 3, 3)  # optimiser steps, not micro-batches
    assert int(a.model.queue_ptr) == int(b.model.queue_ptr) == 3 * 4 % 16  # every key of the step enqueued once
    assert (int(a.model.n_steps), int(b.model.n_steps)) == (3, 6)  # forward passes (the shuffle seed) do count micro-batches
    assert [r['lr'] for r in a.iter_log] == [r['lr'] for r in b.iter_log]
    assert [r['loss'] for r in a.iter_log] == pytest.approx([r['loss'] for r in b.iter_log], rel=1e-5)  # the step's mean loss
    assert densecl_lr(4) == 0.0375 * 4 / 256 and b.model_config['total_bs'] == 4 and b.model_config['bs'] == 2
    assert _learner(2, 2, path=tmp_path).lr == densecl_lr(4)  # the default lr counts the accumulated batch
    # the momentum update runs once per step: after 3 steps the key encoder is 3 updates away, as with the big batch
    assert not torch.equal(sb['encoder_k.proj.weight'], sb['encoder.proj.weight'])


class CountSteps(Callback):
    "Counts the optimiser steps and the momentum updates of a fit."
    order = 31
    def __init__(self): self.steps = self.updates = 0
    def before_batch(self):
        if self.training: self.updates += 1
    def after_step(self): self.steps += 1


def test_accumulation_counts_steps(tmp_path):
    l = _learner(2, 4, path=tmp_path)
    cb = CountSteps(); fit_densecl(l, 3, progress=False, cbs=[cb])
    assert (cb.steps, cb.updates, l.iteration, int(l.model.n_steps)) == (3, 3, 3, 12)


def test_resume_is_exact_with_accumulation(tmp_path):
    "accum = 2: killed after step 3 (mid-pass: 4 steps per pass of 16 slices) and resumed == uninterrupted, bit for bit."
    kw = dict(KW, bs=2, accum=2, steps=6, ckpt_every=3)
    a = tmp_path/'a'/'enc.pth'
    with pytest.raises(KeyboardInterrupt): pretrain_densecl(PH(), out=a, cbs=[Interrupt(3)], **kw)
    assert [p.name for p in list_checkpoints(tmp_path/'a'/'enc_checkpoints')] == ['iter_0000003.pth']  # named by optimiser steps
    assert read_checkpoint(tmp_path/'a'/'enc_checkpoints'/'iter_0000003.pth')['data']['pos'] == 3
    pretrain_densecl(PH(), out=a, resume='last', **kw)
    b = pretrain_densecl(PH(), out=tmp_path/'b'/'enc.pth', **kw)
    ca, cb = (read_checkpoint(list_checkpoints(p.parent/'enc_checkpoints')[-1]) for p in (a, b))
    assert ca['iteration'] == cb['iteration'] == 6 and int(cb['model']['n_steps']) == 12
    diff = [k for k in cb['model'] if not torch.equal(ca['model'][k], cb['model'][k])]
    assert not diff, diff
    assert all(torch.equal(x, y) for x, y in zip(_tensors(ca['opt']), _tensors(cb['opt'])))
    st = read_encoder_meta(b)['settings']
    assert (st['accum'], st['bs'], st['total_bs'], st['lr']) == (2, 2, 4, densecl_lr(4))


def test_step_larger_than_the_slices_reduces_accum(tmp_path):
    "16 slices, bs 4 x accum 5 = 20 per step: accum falls to 4 (16 per step), with a warning; the lr follows the real batch."
    with pytest.warns(UserWarning, match=r'bs=4 x accum=5 .* accum reduced to 4 \(16 images per step'):
        out = pretrain_densecl(PH(), steps=1, out=tmp_path/'a.pth', accum=5, **KW)
    st = read_encoder_meta(out)['settings']
    assert (st['accum'], st['total_bs'], st['lr']) == (4, 16, densecl_lr(16))


def test_queue_rule(tmp_path):
    assert queue_length(16, 16) == 16 and queue_length(8, 16) == 8
    with pytest.warns(UserWarning, match=r'queue=65536 is longer than the 600 training images: capped at 600'): assert queue_length(65536, 600) == 600
    with pytest.warns(UserWarning, match='capped at 16'): l = _learner(4, queue=64, path=tmp_path)
    assert l.model.queue_g.shape == l.model.queue_d.shape == (128, 16) and (l.model_config['queue'], l.model_config['queue_asked']) == (16, 64)
    with warnings.catch_warnings(): warnings.simplefilter('error'); _learner(4, queue=16, path=tmp_path)  # at the rule: no warning
    with pytest.warns(UserWarning, match='capped at 16'): out = pretrain_densecl(PH(), steps=1, out=tmp_path/'q.pth', **{**KW, 'queue': 65536})
    assert read_encoder_meta(out)['settings']['queue'] == read_encoder_meta(out)['n_slices'] == 16


def test_shuffle_groups():
    for n, v in [(8, 2), (64, 2), (64, 8), (256, 8), (12, 3), (6, 2), (8, 8), (5, 1)]:
        for seed in range(3):
            p = shuffle_groups(n, v, torch.Generator().manual_seed(seed))
            assert sorted(p.tolist()) == list(range(n))
            g = n // v
            x = torch.randn(n); assert torch.equal(x[p][torch.argsort(p)], x)  # the unshuffle restores the order
            share = torch.stack([torch.bincount(kg // g, minlength=v) for kg in p.view(v, g)])  # [key group, query group]
            assert share.sum(1).tolist() == [g] * v
            if g % v == 0: assert (share == g // v).all(), (n, v, share)
            else: assert share.max() <= -(-g // v) + 1, (n, v, share)
    a, b = (shuffle_groups(64, 4, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, shuffle_groups(64, 4, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match='groups=3'): shuffle_groups(8, 3)


class TinyBN(nn.Sequential):
    "conv, batch norm, ReLU: the smallest encoder whose training output depends on its batch."
    out_channels, stride = 8, 1
    def __init__(self): super().__init__(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def test_shuffle_bn_in_one_process():
    "k = 2 sub-batches: a key is its key sub-batch's alone (and only that sub-batch matters), unshuffled to the input order; queries per contiguous sub-batch."
    torch.manual_seed(0)
    m = DenseCL(TinyBN(), queue=16, grid=4, shuffle_bn=2).train()
    assert has_batchnorm(m.encoder) and not has_batchnorm(make_encoder('small'))
    x = torch.randn(8, 1, 8, 8)
    perm = m.key_perm(8, 2); groups = perm.view(2, 4)
    fk = m._keys(x)[0]
    for kg in groups: torch.testing.assert_close(fk[kg], m.pool(m.encoder_k(x[kg])), rtol=0, atol=1e-6)  # (a) the sub-batch alone
    assert not torch.allclose(fk, m.pool(m.encoder_k(x)), atol=1e-3)  # the whole batch would give other keys: BN matters here
    i = int(groups[0, 0]); other = int(groups[1, 0]); mate = int(groups[0, 1])
    y = x.clone(); y[other] += 5.  # an image of the other key sub-batch: key i unchanged
    torch.testing.assert_close(m._keys(y)[0][i], fk[i], rtol=0, atol=1e-6)
    y = x.clone(); y[mate] += 5.  # an image of its own key sub-batch: key i changes
    assert not torch.allclose(m._keys(y)[0][i], fk[i], atol=1e-3)
    # the query of image i and its key share statistics with only half of each other's sub-batch (balanced shuffle, g = 4, V = 2)
    for kg in groups: assert sorted(torch.bincount(kg // 4, minlength=2).tolist()) == [2, 2]
    out = m(x, x)
    fq = m.pool(torch.cat([m.encoder(x[:4]), m.encoder(x[4:])]))  # queries: two contiguous sub-batches, as two devices
    torch.testing.assert_close(out['pos_idx'], dense_positives(fq, fk))
    # (b) order: in eval mode (running statistics, no batch dependence) the shuffled path gives exactly the plain keys, in order
    m.eval(); torch.testing.assert_close(m._keys(x)[0], m.pool(m.encoder_k(x)), rtol=0, atol=1e-6)
    torch.testing.assert_close(in_subbatches(lambda t: t * 2, x, 4), x * 2)
    with pytest.raises(ValueError, match='shuffle_bn=2'): m(x[:3], x[:3])


def test_shuffle_bn_default(tmp_path):
    assert _learner(4, path=tmp_path).model.shuffle_bn == 1  # GroupNorm: nothing to shuffle
    assert _learner(4, encoder='resnet18', path=tmp_path).model.shuffle_bn == 2  # batch norm, one process
    assert _learner(4, encoder='resnet18', path=tmp_path, shuffle_bn=4).model.shuffle_bn == 4
    with pytest.raises(ValueError, match='shuffle_bn=3'): _learner(4, encoder='resnet18', path=tmp_path, shuffle_bn=3)
    dls = densecl_dls(unlabeled_slices(PH()), 32, bs=4, device='cpu')
    with pytest.raises(ValueError, match='accum=3'): densecl_learner(dls, 'small', queue=16, grid=4, accum=3)


def _bn_worker(rank, world, port, probe):
    "Rank r of 2: the query path under DDP, 4 images, shuffle_bn=1 per process (the keys shuffled across both)."
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group('gloo')
    try:
        torch.manual_seed(0); x1, x2 = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
        m = DenseCL(TinyBN(), queue=16, grid=4, shuffle_bn=1).train().distribute()
        out = m(x1[4 * rank:4 * rank + 4], x2[4 * rank:4 * rank + 4])
        DenseCLLoss(0.5)(out).backward()
        torch.save({'out': {k: v.detach() for k, v in out.items()}, 'grad': [p.grad.clone() for p in m.query_params()]}, f"{probe}/rank{rank}.pt")
    finally: dist.destroy_process_group()


def test_shuffle_bn_one_process_equals_two():
    "One process with 2 BN sub-batches == 2 processes of one: the same keys, logits and (DDP-averaged) gradients."
    import torch.multiprocessing as mp, tempfile
    probe = tempfile.mkdtemp()
    mp.spawn(_bn_worker, args=(2, _free_port(), probe), nprocs=2, join=True)
    r = [torch.load(f"{probe}/rank{i}.pt", weights_only=True) for i in (0, 1)]
    torch.manual_seed(0); x1, x2 = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
    m = DenseCL(TinyBN(), queue=16, grid=4, shuffle_bn=2).train()
    out = m(x1, x2); DenseCLLoss(0.5)(out).backward()
    for k in ('pos_g', 'neg_g', 'k_g', 'k_d', 'pos_idx'):
        torch.testing.assert_close(out[k], torch.cat([r[0]['out'][k], r[1]['out'][k]]), rtol=0, atol=1e-5, msg=k)
    torch.testing.assert_close(out['pos_d'], torch.cat([r[0]['out']['pos_d'], r[1]['out']['pos_d']]), rtol=0, atol=1e-5)
    for g, g0, g1 in zip([p.grad for p in m.query_params()], r[0]['grad'], r[1]['grad']): torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(g0, g1) for g0, g1 in zip(r[0]['grad'], r[1]['grad']))  # DDP averaged


def test_two_processes_with_accumulation(tmp_path):
    "2 ranks x 2 pairs x accum 2 (8 images per step; the first micro-batch without gradient sync): ranks stay identical, steps count once."
    import torch.multiprocessing as mp
    (tmp_path/'run').mkdir(); (tmp_path/'probe').mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path/'run'/'enc.pth'), str(tmp_path/'probe'), dict(bs=2, accum=2)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path/'probe'/f'rank{r}.pt', weights_only=True) for r in (0, 1))
    diff = [k for k in r0['state'] if not torch.equal(r0['state'][k], r1['state'][k])]
    assert not diff, diff
    assert int(r0['state']['queue_ptr']) == 3 * 2 * 2 * 2 % 16 and int(r0['state']['n_steps']) == 6
    st = read_encoder_meta(tmp_path/'run'/'enc.pth')['settings']
    assert (st['world'], st['accum'], st['bs'], st['total_bs'], st['lr']) == (2, 2, 2, 8, densecl_lr(8))
    assert read_checkpoint(tmp_path/'run'/'enc_checkpoints'/'iter_0000003.pth')['iteration'] == 3


# ---------------------------------------------------------------- stage 1 -> stage 2 wiring (config, train_fold, run_experiment)
import dataclasses
from types import SimpleNamespace
import fsmis.learner as FL
from fsmis.config import ExperimentConfig
from fsmis import experiments as X, train as T


class _Started(Exception): pass


@pytest.fixture
def small_weights(tmp_path_factory):
    "A DenseCL weights file of the small encoder (3 steps), and its state dict."
    out = pretrain_densecl(PH(), 'small', steps=3, out=tmp_path_factory.mktemp('w')/'w.pth', **KW)
    return out, torch.load(out, weights_only=True)['state_dict']


@pytest.mark.parametrize('method', ['adnet', 'panet', 'alpnet'])
def test_training_starts_from_encoder_weights(small_weights, monkeypatch, tmp_path, method):
    "train_fold with encoder_weights: the encoder the optimiser starts from is the file's, for every method."
    monkeypatch.setenv('FSMIS_CACHE', str(tmp_path/'cache'))
    path, sd = small_weights
    seen = {}
    def fit(learn, *a, **k):  # stands in for the training loop: record the weights it would start from
        seen['enc'] = {k_: v.detach().clone() for k_, v in learn.model.encoder.state_dict().items()}; raise _Started
    monkeypatch.setattr(FL, 'fit_iters', fit)
    ds = open_dataset('phantom', n_cases=4, shape=(16, 48, 48))
    cfg = ExperimentConfig(dataset='phantom', method=method, n_steps=1, size=32, rho=200, device='cpu', encoder_weights=str(path))
    with pytest.raises(_Started): T.train_fold(cfg, ds, ['1', '2', '3'], seed=0)
    assert seen['enc'].keys() == sd.keys() and all(torch.equal(seen['enc'][k], v) for k, v in sd.items())
    # the check can fail: without the file the same seed starts elsewhere
    with pytest.raises(_Started): T.train_fold(dataclasses.replace(cfg, encoder_weights=None), ds, ['1', '2', '3'], seed=0)
    assert not torch.equal(seen['enc']['proj.weight'], sd['proj.weight'])
    assert all(torch.equal(T.initial_model(cfg).encoder.state_dict()[k], v) for k, v in sd.items())  # the 'untrained' baseline too


def test_mismatching_encoder_weights_fail_early_with_the_file_name(small_weights, monkeypatch, tmp_path):
    path, sd = small_weights
    import fsmis.data.supervoxels as SV
    monkeypatch.setattr(SV, 'dataset_supervoxels', lambda *a, **k: pytest.fail('pseudo-labels computed before the check'))
    ds = open_dataset('phantom', n_cases=4, shape=(16, 48, 48))
    cfg = ExperimentConfig(dataset='phantom', encoder='resnet18', n_steps=1, size=32, device='cpu', encoder_weights=str(path))
    with pytest.raises(ValueError, match=r"w\.pth.*'small' encoder.*'resnet18'"): T.train_fold(cfg, ds, ['1', '2', '3'])
    with pytest.raises(ValueError, match=r"w\.pth"): T.initial_model(cfg)
    torch.save(sd, tmp_path/'plain.pth')  # a bare state dict (no meta): the loader's own check names the file
    with pytest.raises(ValueError, match=r"plain\.pth.*resnet18"): T.initial_model(dataclasses.replace(cfg, encoder_weights=str(tmp_path/'plain.pth')))
    with pytest.raises(FileNotFoundError, match='nowhere.pth'): T.train_fold(dataclasses.replace(cfg, encoder_weights=str(tmp_path/'nowhere.pth')), ds, ['1'])


def test_stage1_per_fold_reads_only_the_fold_training_scans(tmp_path, monkeypatch):
    """pretrain_steps in an experiment: stage 1 of each fold opens the image files of that fold's training cases and
    nothing else (no label, no test case); that fold's few-shot training starts from that file; a rerun reuses it."""
    from fsmis.data.folds import fold_split
    from fsmis.eval.protocols import IntensityPrototype
    import fsmis.pretrain.densecl as D
    d = tmp_path/'scans'; PhantomDataset(6, shape=(8, 48, 48)).to_folder(d)
    ds = open_dataset(d, classes={1: 'liver', 2: 'right kidney', 3: 'left kidney', 4: 'spleen'})
    opened, inside, real_load, real_pre = [], [False], nibabel.load, D.pretrain_densecl
    def load(f, *a, **k):
        if inside[0]: opened[-1].append(os.path.basename(str(f)))
        return real_load(f, *a, **k)
    def pre(*a, **k):
        inside[0] = True; opened.append([])
        try: return real_pre(*a, **k)
        finally: inside[0] = False
    monkeypatch.setattr(nibabel, 'load', load); monkeypatch.setattr(D, 'pretrain_densecl', pre)
    started = []
    def fake_train(cfg, ds, train_ids, seed=None, test_classes=None, store=None):
        started.append((sorted(train_ids), cfg.encoder_weights))
        m = IntensityPrototype(); m.model_kind, m.model_config = 'intensity', {}  # `run_experiment` writes each run's model file
        return SimpleNamespace(model=m, train_info=dict(train_s=0., steps=0, select=cfg.select))
    monkeypatch.setattr(X, 'train_fold', fake_train)
    cfg = ExperimentConfig(name='s1', dataset=str(d), method='adnet', folds=[0, 1], n_folds=2, runs=1, baselines=[], protocols=['EP2'], classes=['liver'],
                           device='cpu', pretrain_steps=2, pretrain_kw=dict(size=32, bs=2, queue=16, grid=4))
    X.run_experiment(cfg, tmp_path/'exp', dataset=ds, progress=False)
    assert len(opened) == 2 and len(started) == 2
    for fold, files, (train_ids, w) in zip([0, 1], opened, started):
        sp = fold_split(ds.case_ids, fold, 2)
        assert sorted(files) == sorted(f'image_{c}.nii.gz' for c in sp.train_ids), (fold, files)
        assert train_ids == sorted(sp.train_ids) and Path(w) == tmp_path/'exp'/f'densecl_fold{fold}.pth'
        assert read_encoder_meta(w)['case_ids'] == sorted(sp.train_ids)
    assert started[0][1] != started[1][1]
    opened.clear(); started.clear()
    X.run_experiment(cfg, tmp_path/'exp', dataset=ds, progress=False)  # cached: no stage 1 again
    assert opened == [] and len(started) == 2
    with pytest.raises(ValueError, match='densecl_fold0.pth'):  # a cached file of another split is refused, not reused
        X.run_experiment(dataclasses.replace(cfg, n_folds=3, folds=[0]), tmp_path/'exp', dataset=ds, progress=False)


def test_precision_one_rule_with_the_few_shot_learners(tmp_path):
    "`precision` as the few-shot learners take it: bf16 autocast on a CPU that has it, the InfoNCE logits still float32; fp16 refused on the CPU."
    from fsmis.learner import cpu_has_bf16, CPUAutocast
    sl = unlabeled_slices(PhantomDataset(1, shape=(8, 48, 48)))
    with pytest.raises(ValueError, match='CUDA'): densecl_learner(densecl_dls(sl, 32, bs=4, device='cpu'), 'small', queue=8, grid=4, precision='fp16', path=tmp_path)
    assert densecl_learner(densecl_dls(sl, 32, bs=4, device='cpu'), 'small', queue=8, grid=4, path=tmp_path).precision == 'fp32'
    if not cpu_has_bf16(): pytest.skip('this CPU reports no bfloat16 support (AMX / AVX-512 BF16)')
    torch.manual_seed(0)
    learn = densecl_learner(densecl_dls(sl, 32, bs=4, device='cpu'), 'small', queue=8, grid=4, precision='auto', path=tmp_path)
    assert learn.precision == 'bf16' and any(isinstance(cb, CPUAutocast) for cb in learn.cbs)
    x1, x2 = learn.dls.train.one_batch()[:2]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = learn.model(x1, x2)
    assert all(out[k].dtype == torch.float32 for k in ('pos_g', 'neg_g', 'pos_d', 'neg_d'))
    fit_densecl(learn, 3, progress=False)
    assert all(math.isfinite(r['loss']) for r in learn.iter_log) and len(learn.iter_log) == 3
