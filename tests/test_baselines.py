"Tests of the few-shot baselines PPNet (fsmis.models.ppnet), CANet (fsmis.models.canet) and SE-Net (fsmis.models.senet): shapes, gradients, determinism, the evaluation path, training steps (CPU, torch only, no learner)."
import numpy as np, pytest, torch
from fsmis.models.ppnet import PPNet, kmeans, part_features
from fsmis.models.canet import CANet, DenseComparison, IOM
from fsmis.models.senet import SENet
from fsmis.losses import ProtoCELoss
from fsmis.eval.inference import predict_tasks, segment_volume, encode_volume, eval_mode
from fsmis.eval.protocols import Task

torch.set_num_threads(1)

# tiny models: the 'small' encoder; CANet with a narrow decoder and ASPP dilations that fit a 12-16 cell grid
MODELS = {'ppnet': lambda: PPNet('small'),
          'canet': lambda: CANet('small', width=32, dilations=(2, 4, 6)),
          'senet': lambda: SENet(width=16, cond_width=8)}
LOSSES = {'ppnet': lambda: ProtoCELoss(w_bg=1.0), 'canet': lambda: ProtoCELoss(w_bg=1.0, par=False),
          'senet': lambda: ProtoCELoss(w_bg=1.0, par=False, w_dice=1.0)}


def squares(B=2, K=1, Q=1, H=48, g=None):
    "Episodes (sup_imgs [B,K,1,H,H], sup_masks [B,K,H,H], qry_imgs [B,Q,1,H,H], qry_masks [B,Q,H,H]): a bright random square on noise."
    n = K + Q
    img = torch.randn(B, n, 1, H, H, generator=g) * 0.5; m = torch.zeros(B, n, H, H)
    for b in range(B):
        for k in range(n):
            y, x = torch.randint(2, H // 2, (2,), generator=g).tolist(); s = int(torch.randint(H // 4, H // 2, (1,), generator=g))
            m[b, k, y:y+s, x:x+s] = 1
    img = img + 1.5 * m[:, :, None]
    return img[:, :K], m[:, :K], img[:, K:], m[:, K:].long()


def phantom_volume(z=6, H=48):
    "A synthetic (z, H, H) volume with two classes: a bright disc (1) and a dark square (2) moving slowly over the slices."
    rng = np.random.default_rng(0)
    img = rng.normal(0, 0.3, (z, H, H)).astype(np.float32); lab = np.zeros((z, H, H), np.int64)
    yy, xx = np.mgrid[:H, :H]
    for i in range(z):
        disc = (yy - 15 - i) ** 2 + (xx - 15) ** 2 < 64; lab[i][disc] = 1; img[i][disc] += 2
        lab[i, 28:40, 26+i//2:38+i//2] = 2; img[i, 28:40, 26+i//2:38+i//2] -= 2
    return img, lab


@pytest.mark.parametrize('name', MODELS)
def test_forward_shapes(name):
    torch.manual_seed(0); net = MODELS[name]()
    si, sm, qi, qm = squares(B=2, K=2, Q=3, g=torch.Generator().manual_seed(1))
    out = net(si, sm, qi)
    assert out['qry'].shape == (2, 3, 2, 48, 48) and torch.isfinite(out['qry']).all()
    assert torch.equal(out['sup_masks'], sm)
    if name == 'ppnet': assert out['sup'].shape == (2, 2, 2, 48, 48)
    else: assert 'sup' not in out
    net.eval()
    with torch.inference_mode():
        sf, qf = net.encode(si[0]), net.encode(qi[0])
        for n_cls in (1, 2):
            masks = torch.stack([sm[0], 1 - sm[0]], 1)[:, :n_cls]
            probs = net.segment(qf, net.prototypes(sf, masks), size=(48, 48))
            assert probs.shape == (3, 1 + n_cls, 48, 48) and (probs >= 0).all() and (probs <= 1).all()
            if n_cls == 1: torch.testing.assert_close(probs.sum(1), torch.ones(3, 48, 48))
        probs = net.predict(si[0], sm[0], qi[0]); assert probs.shape == (3, 2, 48, 48)


def test_table3_columns():
    assert PPNet('small').prototype_count() == {'fg': 5, 'bg': 5} and PPNet.decoder is False
    assert PPNet('small', parts=3).prototype_count() == {'fg': 3, 'bg': 3}
    assert CANet('small', width=16).prototype_count() == {'fg': 1, 'bg': 0} and CANet.decoder is True
    protos = PPNet('small').eval().prototypes(torch.randn(1, 128, 12, 12), torch.ones(1, 2, 48, 48))
    assert protos.shape == (3, 5, 128)  # background + 2 classes, 5 parts each
    assert CANet('small', width=16).prototypes(torch.randn(2, 128, 12, 12), torch.ones(2, 2, 48, 48)).shape == (2, 128)
    assert SENet(width=8, cond_width=4).prototype_count() == {'fg': 0, 'bg': 0} and SENet.decoder is True


@pytest.mark.parametrize('name', MODELS)
def test_gradients_flow(name):
    torch.manual_seed(0); net = MODELS[name]()
    si, sm, qi, qm = squares(g=torch.Generator().manual_seed(2))
    LOSSES[name]()(net(si, sm, qi), qm).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_ppnet_par_gradient_reaches_encoder():
    "The PAR term alone (prototypes from the predicted query mask, k-means included) back-propagates into the encoder."
    torch.manual_seed(0); net = PPNet('small')
    si, sm, qi, qm = squares(g=torch.Generator().manual_seed(3))
    ProtoCELoss(w_bg=1.0, seg=False)(net(si, sm, qi), qm).backward()
    assert net.encoder.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('name', MODELS)
def test_deterministic_under_seed(name):
    si, sm, qi, qm = squares(g=torch.Generator().manual_seed(4))
    res = []
    for _ in range(2):
        torch.manual_seed(0); net = MODELS[name]()
        out = net(si, sm, qi); loss = LOSSES[name]()(out, qm); loss.backward()
        res.append((out['qry'].detach(), float(loss.detach()), next(p for p in net.parameters() if p.grad is not None).grad.clone()))
    assert torch.equal(res[0][0], res[1][0]) and res[0][1] == res[1][1] and torch.equal(res[0][2], res[1][2])
    # at test time the same support gives the same prediction, whatever the global RNG did in between
    net.eval()
    with torch.inference_mode():
        a = net.predict(si[0], sm[0], qi[0]); torch.rand(10); b = net.predict(si[0], sm[0], qi[0])
    assert torch.equal(a, b)


@pytest.mark.parametrize('name', MODELS)
def test_predict_tasks_and_segment_volume(name):
    torch.manual_seed(0); net = MODELS[name]()
    img, lab = phantom_volume()
    with eval_mode(net):
        qf = encode_volume(net, img)
        tasks = [Task(cls=1, sup_slices=[2], qry_slices=np.arange(6)), Task(cls=2, sup_slices=[1, 3], qry_slices=np.arange(3))]
        pred = predict_tasks(net, qf, img.shape[1:], img, lab, tasks)
    assert set(pred) == {1, 2}
    for c in (1, 2): assert pred[c].shape == img.shape and pred[c].dtype == np.uint8 and set(np.unique(pred[c])) <= {0, 1}
    assert not pred[2][3:].any()  # slices outside the task stay empty
    out = segment_volume(net, img, img[2], lab[2])  # both classes from one slice
    assert out.shape == img.shape and set(np.unique(out)) <= {0, 1, 2}
    out1 = segment_volume(net, img, img[[1, 2]], lab[[1, 2]], classes=[1], size=(32, 32))  # two shots, resized
    assert out1.shape == img.shape and set(np.unique(out1)) <= {0, 1}
    assert net.training  # eval_mode restored the flag


@pytest.mark.parametrize('name', MODELS)
def test_training_lowers_the_loss(name):
    torch.manual_seed(0); g = torch.Generator().manual_seed(0)
    net = CANet('small', width=32, dilations=(2, 4, 6), dropout=0.) if name == 'canet' else MODELS[name]()
    crit = LOSSES[name](); opt = torch.optim.Adam(net.parameters(), lr=3e-3 if name == 'senet' else 1e-3)  # SE-Net: two arms from scratch
    batches = [squares(B=2, g=g) for _ in range(4)]
    def held_out_loss():
        with torch.no_grad(), eval_mode(net): return float(sum(crit(net(si, sm, qi), qm) for si, sm, qi, qm in batches)) / len(batches)
    before = held_out_loss()
    for _ in range(25):
        si, sm, qi, qm = squares(B=2, g=g)
        loss = crit(net(si, sm, qi), qm); opt.zero_grad(); loss.backward(); opt.step()
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)


def test_kmeans_and_part_features():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 3, generator=g) * 0.05 + i * 4 for i in range(5)])
    c, a = kmeans(x, 5, generator=torch.Generator().manual_seed(1))
    for j in range(5): torch.testing.assert_close(c[j], x[a == j].mean(0)) if (a == j).any() else None
    assert len(set(a.tolist())) >= 4  # well-separated blobs: (almost) one cluster each from random starts
    with pytest.raises(ValueError, match='points'): kmeans(torch.zeros(3), 2)
    with pytest.raises(ValueError, match='k=0'): kmeans(torch.zeros(3, 2), 0)
    f = torch.randn(2, 4, 6, 6); m = torch.zeros(2, 24, 24); m[0, :12] = 1; m[1, 3, 3] = 1
    pts = part_features(f, m)
    assert pts.shape == (6 * 12 + 1, 4)  # shot 0: half of the 12 x 12 grid; shot 1: its single pixel


def test_bad_arguments():
    with pytest.raises(ValueError, match='parts'): PPNet('small', parts=0)
    with pytest.raises(ValueError, match='out_channels'): CANet(torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3)))
    with pytest.raises(ValueError, match='iom_steps'): CANet('small', iom_steps=-1)
    with pytest.raises(ValueError, match='expected'): PPNet('small')(torch.zeros(1, 1, 48, 48), torch.zeros(1, 48, 48), torch.zeros(1, 1, 48, 48))


def test_canet_refine_passes():
    torch.manual_seed(0); net = CANet('small', width=16, iom_steps=2).eval()
    with torch.inference_mode():
        outs = net.refine(torch.randn(2, 128, 12, 12), torch.randn(128))
        assert len(outs) == 3 and all(o.shape == (2, 2, 12, 12) for o in outs)
        assert len(net.refine(torch.randn(1, 128, 12, 12), torch.randn(128), steps=0)) == 1
        p0 = net.segment(torch.randn(1, 128, 12, 12), torch.randn(1, 128), (48, 48), steps=0)
    assert p0.shape == (1, 2, 48, 48)
    assert DenseComparison(8, 4)(torch.randn(1, 8, 5, 5), torch.randn(8)).shape == (1, 4, 5, 5)
    assert IOM(4, (1,))(torch.randn(1, 4, 5, 5), torch.zeros(1, 2, 5, 5)).shape == (1, 2, 5, 5)


@pytest.mark.parametrize('name,cfg', [('ppnet', dict(encoder='small', parts=4, par=True)),
                                      ('canet', dict(encoder='small', width=16, iom_steps=2, dilations=[2, 4], par=False)),
                                      ('senet', dict(encoder='small', width=8, cond_width=4, par=False))])
def test_rebuild_from_config(name, cfg, tmp_path):
    "What a checkpoint stores (constructor config incl. the learner's `par`, state dict) rebuilds the same model."
    cls = {'ppnet': PPNet, 'canet': CANet, 'senet': SENet}[name]
    torch.manual_seed(0); net = cls(**cfg).eval()
    torch.save(net.state_dict(), tmp_path / 'm.pth')
    torch.manual_seed(1); net2 = cls(**cfg); net2.load_state_dict(torch.load(tmp_path / 'm.pth', weights_only=True)); net2.eval()
    si, sm, qi, _ = squares(g=torch.Generator().manual_seed(5))
    with torch.inference_mode(): assert torch.equal(net.predict(si[0], sm[0], qi[0]), net2.predict(si[0], sm[0], qi[0]))
    if name == 'canet':
        with pytest.raises(ValueError, match='PAR'): CANet('small', width=16, par=True)


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('protocol', ['EP1', 'EP2', 'ouyang'])
def test_protocols_run_unchanged(name, protocol):
    "The evaluation protocols (EP1, EP2, Ouyang's) score the models as they score ADNet: one row per class, Dice in [0, 1]."
    from fsmis.data.phantom import make_phantom
    from fsmis.eval.protocols import evaluate_case
    sup, qry = make_phantom(0, shape=(8, 48, 48)), make_phantom(1, shape=(8, 48, 48))
    torch.manual_seed(0); net = MODELS[name]().eval()
    rows = evaluate_case(net, sup, qry, classes={1: 'liver', 4: 'spleen'}, protocol=protocol)
    assert sorted(r['cls'] for r in rows) == [1, 4]
    assert all(0 <= r['dice'] <= 1 and r['protocol'] == protocol for r in rows), rows


def test_senet_bad_arguments():
    with pytest.raises(ValueError, match='own two arms'): SENet('resnet18')
    with pytest.raises(ValueError, match='from scratch'): SENet(weights='x.pth')
    with pytest.raises(ValueError, match='PAR'): SENet(par=True)
    with pytest.raises(ValueError, match='multiples of 16'): SENet(width=8, cond_width=4).predict(torch.zeros(1, 1, 40, 40), torch.zeros(1, 40, 40), torch.zeros(1, 1, 40, 40))


def test_senet_conditioner_decides():
    "The support acts: the same query under another support mask gets another prediction (the conditioner is not ignored)."
    torch.manual_seed(0); net = SENet(width=8, cond_width=4).eval()
    si, sm, qi, _ = squares(g=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        a = net.predict(si[0], sm[0], qi[0]); b = net.predict(si[0], 1 - sm[0], qi[0])
    assert not torch.allclose(a, b)


def _phantom_with_groups():
    "Five phantom cases whose organs form Ouyang's two label groups: liver + spleen (1, 4) and the kidneys (2, 3)."
    from fsmis.data.datasets import open_dataset
    ds = open_dataset('phantom', n_cases=5, shape=(32, 48, 48))
    ds.spec.label_groups = {'upper': [ds.classes[1], ds.classes[4]], 'lower': [ds.classes[2], ds.classes[3]]}
    return ds


def _spy_supervised(monkeypatch):
    "A list that records, for every SupervisedSampler built, its cases, training classes, test classes and setting."
    from fsmis.data import episodes as E
    calls, real = [], E.SupervisedSampler.__init__
    def spy(self, cases, classes, test_classes=(), setting=1, **kw):
        calls.append(dict(cases=sorted(c.case_id for c in cases), classes=sorted(classes), test=sorted(test_classes), setting=setting))
        return real(self, cases, classes, test_classes, setting, **kw)
    monkeypatch.setattr(E.SupervisedSampler, '__init__', spy)
    return calls


def test_supervised_training_sees_only_the_training_label_group(tmp_path, monkeypatch):
    "pseudo_labels='labels' (vanilla PANet, SE-Net): episodes of the other label group's classes, training cases only, Setting 2 slices excluded."
    from fsmis.config import ExperimentConfig
    from fsmis import train as T
    calls, ds = _spy_supervised(monkeypatch), _phantom_with_groups()
    for setting in (1, 2):
        cfg = ExperimentConfig(name='t', dataset='phantom', method='senet', pseudo_labels='labels', n_steps=2, size=48, setting=setting)
        learn = T.train_fold(cfg, ds, ['1', '2', '3', '4'], seed=0, test_classes=[1, 4])
        seen = calls[-1]
        assert seen['cases'] == ['1', '2', '3', '4'] and seen['test'] == [1, 4] and seen['setting'] == setting
        assert seen['classes'] == [2, 3], seen  # the other group only, never a tested class
        assert learn.train_info['steps'] == 2 and type(learn.model).__name__ == 'SENet'


def test_autocast_reaches_a_learned_decoder_not_a_prototype_head():
    "Under bf16 autocast CANet's decoder convolutions run in bfloat16 (its prototype stays float32); PPNet's cosine head stays float32."
    torch.manual_seed(0); si, sm, qi, qm = squares(g=torch.Generator().manual_seed(7))
    net, seen = CANet('small', width=16, dilations=(2, 4, 6)), {}
    net.dcm.register_forward_hook(lambda m, i, o: seen.update(dcm=o.dtype, proto=i[1].dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16): out = net(si, sm, qi)
    assert seen == {'dcm': torch.bfloat16, 'proto': torch.float32}
    ProtoCELoss(w_bg=1.0, par=False)(out, qm).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    with torch.autocast('cpu', dtype=torch.bfloat16): o2 = PPNet('small')(si, sm, qi)
    assert o2['qry'].dtype == torch.float32


def test_supervised_stage_is_not_shared_between_label_groups(tmp_path, monkeypatch):
    "Setting 1 shares a self-supervised stage 2 between label groups; a supervised one trains per group on the other group's labels (a shared one saw every label)."
    from fsmis.config import ExperimentConfig
    from fsmis import train as T
    calls, ds = _spy_supervised(monkeypatch), _phantom_with_groups()
    cfg = ExperimentConfig(name='t', dataset='phantom', method='panet', pseudo_labels='labels', n_steps=2, size=48, setting=1)
    for test in ([1, 4], [2, 3]): T.train_stages(cfg, ds, ['1', '2', '3', '4'], tmp_path, 'fold0_run0', seed=0, test_classes=test)
    seen = [c['classes'] for c in calls]
    assert seen == [[2, 3], [1, 4]], seen
    assert sorted(p.name for p in tmp_path.glob('stage2_*.pth')) == ['stage2_fold0_run0_test1-4.pth', 'stage2_fold0_run0_test2-3.pth']
    with pytest.raises(ValueError, match='no evaluated class'): T.train_classes(ds, [])
