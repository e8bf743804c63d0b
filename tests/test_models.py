"Tests of fsmis.models (encoders, ADNet, ALPNet, PANet) and fsmis.losses on small synthetic episodes (CPU, no network)."
import pytest, torch, torch.nn.functional as F, torchvision
from fsmis.models.encoders import make_encoder, SmallCNN, ResNetEncoder, ENCODERS
from fsmis.models.adnet import ADNet, masked_average_pool, mask_weights
from fsmis.models.alpnet import ALPNet, PANet, local_prototypes, proto_score
from fsmis.losses import ADNetLoss, ProtoCELoss
from fsmis.data.phantom import ToyEpisodes

torch.set_num_threads(1)


def episode(B=1, K=1, Q=1, size=64, seed=0):
    "A batch of toy episodes in the DataLoader format."
    torch.manual_seed(seed)
    ds = ToyEpisodes(10, size, n_shots=K, n_queries=Q)
    items = [ds[i] for i in range(B)]
    return [torch.stack([it[j] for it in items]) for j in range(4)]


@pytest.mark.parametrize('name,size,shape', [('small', 64, (2, 128, 16, 16)), ('resnet18', 64, (2, 256, 8, 8)),
                                             ('resnet34', 64, (2, 256, 8, 8)), ('resnet50', 64, (2, 256, 8, 8)),
                                             ('resnet101', 64, (2, 256, 8, 8))])
def test_encoder_shapes(name, size, shape):
    enc = make_encoder(name).eval()
    with torch.no_grad(): f = enc(torch.randn(2, 1, size, size))
    assert f.shape == shape and enc.out_channels == shape[1] and enc.stride == size // shape[-1]


def test_resnet101_dilated():
    enc = make_encoder('resnet101')
    assert enc.backbone[7][0].conv2.dilation == (2, 2) and enc.proj.bias is None and enc.proj.out_channels == 256


def test_encoder_weights(tmp_path):
    tv = torchvision.models.resnet50(); torch.save(tv.state_dict(), tmp_path/'r50.pth')
    enc = make_encoder('resnet50', weights=tmp_path/'r50.pth')
    assert torch.equal(enc.backbone[6][2].conv3.weight, tv.layer3[2].conv3.weight)
    # an fsmis training checkpoint ({'model': {'encoder.*': ...}})
    m = ADNet('small'); torch.save({'model': m.state_dict(), 'iteration': 3}, tmp_path/'ck.pth')
    e2 = make_encoder('small', weights=tmp_path/'ck.pth')
    assert torch.equal(e2.proj.weight, m.encoder.proj.weight)
    with pytest.raises(ValueError, match='does not match'): make_encoder('resnet18', weights=tmp_path/'ck.pth')
    with pytest.raises(FileNotFoundError): make_encoder('small', weights=tmp_path/'nope.pth')
    with pytest.raises(ValueError, match='tv_weights'): make_encoder('small', tv_weights='IMAGENET1K_V1')
    with pytest.raises(ValueError, match='encoder='): make_encoder('vgg16')


def test_single_channel_repeated():
    enc = make_encoder('resnet18').eval(); x = torch.randn(1, 1, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(enc(x), enc(x.repeat(1, 3, 1, 1)))


def test_map_equals_upsampled_features():
    feats, masks = torch.randn(3, 16, 8, 8, dtype=torch.float64), (torch.rand(3, 2, 64, 48) > 0.5).double()
    feats = F.interpolate(feats, size=(8, 6))
    up = F.interpolate(feats, size=(64, 48), mode='bilinear', align_corners=False)
    ref = (up[:, None] * masks[:, :, None]).sum((-2, -1)) / (masks.sum((-2, -1))[..., None] + 1e-5)
    torch.testing.assert_close(masked_average_pool(feats, masks), ref)
    torch.testing.assert_close(mask_weights(masks, (8, 6)).sum((-2, -1)), masks.sum((-2, -1)))  # partition of unity


@pytest.mark.parametrize('B,K,Q', [(1, 1, 1), (2, 3, 2)])
@pytest.mark.parametrize('cls', [ADNet, ALPNet, PANet])
def test_forward_shapes(cls, B, K, Q):
    si, sm, qi, qm = episode(B, K, Q, size=48)
    out = cls('small')(si, sm, qi)
    assert out['qry'].shape == (B, Q, 2, 48, 48) and out['sup'].shape == (B, K, 2, 48, 48)
    assert torch.equal(out['sup_masks'], sm)
    assert 'sup' not in cls('small', par=False)(si, sm, qi)


def test_adnet_formula():
    "p_fg = 1 - sigmoid(kappa(-alpha cos - T)) at feature resolution, then bilinear upsampling."
    net = ADNet('small', alpha=10., kappa=0.25, t_init=-3.)
    f, p = torch.randn(2, 128, 4, 4), torch.randn(1, 128)
    cos = F.cosine_similarity(f, p[:, :, None, None], dim=1)
    torch.testing.assert_close(net.fg_prob(f, p)[:, 0], 1 - torch.sigmoid(0.25 * (-10 * cos + 3)))
    probs = net.segment(f, p, (16, 16))
    torch.testing.assert_close(probs[:, 1:], F.interpolate(net.fg_prob(f, p), size=(16, 16), mode='bilinear', align_corners=True))
    assert float(net.T.detach()) == -3. and net.threshold == -3.


def test_adnet_multiclass_and_kshot():
    net = ADNet('small').eval()
    sf = torch.randn(3, 128, 8, 8); masks = torch.zeros(3, 2, 32, 32); masks[:, 0, :16] = 1; masks[:, 1, 16:] = 1
    masks[2, 1] = 0  # class 2 absent from shot 3: averaged over shots 1-2 only
    with torch.inference_mode():
        protos = net.prototypes(sf, masks)
        per_shot = masked_average_pool(sf, masks)
        torch.testing.assert_close(protos[0], per_shot[:, 0].mean(0)); torch.testing.assert_close(protos[1], per_shot[:2, 1].mean(0))
        probs = net.segment(torch.randn(2, 128, 8, 8), protos, size=(32, 32))
    assert probs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(probs[:, 0], 1 - probs[:, 1:].max(1)[0])
    with torch.inference_mode():
        lo = net.segment(torch.randn(2, 128, 8, 8), protos, size=(32, 32), T=-19.)
    assert lo[:, 1:].max() < 0.5 + 1e-6 or lo[:, 1:].mean() < probs[:, 1:].mean()


def test_gradients_reach_T():
    si, sm, qi, qm = episode()
    net = ADNet('small'); loss = ADNetLoss()(net(si, sm, qi), qm)
    loss.backward()
    assert net.T.grad is not None and float(net.T.grad) != 0
    # also through L_S alone (not only the direct L_T term)
    net.zero_grad(); ADNetLoss(thresh=False, par=False)(net(si, sm, qi), qm).backward()
    assert float(net.T.grad) != 0


def test_ablation_switches_change_loss():
    si, sm, qi, qm = episode()
    torch.manual_seed(0); out = ADNet('small')(si, sm, qi)
    full = float(ADNetLoss()(out, qm))
    for k in ('seg', 'thresh', 'par'):
        l = ADNetLoss(**{k: False}); v = float(l(out, qm))
        assert abs(v - full) > 1e-4, k
        assert k not in l.last
    out2 = ALPNet('small')(si, sm, qi)
    assert abs(float(ProtoCELoss()(out2, qm)) - float(ProtoCELoss(par=False)(out2, qm))) > 1e-4
    with pytest.raises(ValueError, match='par=True'): ADNetLoss()(ADNet('small', par=False)(si, sm, qi), qm)
    with pytest.raises(ValueError, match='switched off'): ADNetLoss(seg=False, thresh=False, par=False)(out, qm)


def test_adnet_loss_values():
    "L_S is the 0.1/1.0-weighted NLL of the probabilities; L_T = T/alpha; L_PAR unweighted NLL on the supports."
    q = torch.rand(1, 1, 2, 8, 8); q = q / q.sum(2, keepdim=True); s = torch.rand(1, 1, 2, 8, 8); s = s / s.sum(2, keepdim=True)
    y = (torch.rand(1, 1, 8, 8) > 0.5).long(); sm = (torch.rand(1, 1, 8, 8) > 0.5).float()
    out = {'qry': q, 'sup': s, 'sup_masks': sm, 'T': torch.tensor([-10.]), 'alpha': torch.tensor([20.])}
    l = ADNetLoss(); l(out, y)
    lp = q[0, 0].log().gather(0, y[0])[0]; w = torch.where(y[0, 0] == 1, 1.0, 0.1)
    assert l.last['seg'] == pytest.approx(float(-(lp * w).sum() / w.sum()), rel=1e-5)
    assert l.last['thresh'] == pytest.approx(-0.5)
    assert l.last['par'] == pytest.approx(float(-s[0, 0].log().gather(0, sm.long()[0]).mean()), rel=1e-5)


def test_alp_coverage_rule():
    "A window is a local prototype only if more than 95 % of it is inside the mask."
    f = torch.randn(1, 4, 8, 8)
    m = torch.zeros(1, 8, 8)
    m[0, :4, :4] = 1                # window (0,0) fully covered at 4x4
    m[0, :4, 4:] = 1; m[0, 0, 7] = 0  # window (0,1): 15/16 = 93.75 % -> rejected
    lp = local_prototypes(f, m, 4)
    assert lp.shape == (1, 4)
    torch.testing.assert_close(lp[0], f[0, :, :4, :4].mean((-2, -1)))
    # at 2x2: windows of the top-left quadrant (4) and 3 of the 4 top-right ones (the one with a hole is 75 %)
    assert len(local_prototypes(f, m, 2)) == 4 + 3
    assert len(local_prototypes(f, m, 2, thresh=0.7)) == 8


def test_alpnet_prototypes_train_vs_test():
    net = ALPNet('small'); f = torch.randn(1, 128, 16, 16); m = torch.zeros(1, 1, 64, 64); m[..., :32, :] = 1
    net.train(); p4 = net.prototypes(f, m)
    net.eval(); p2 = net.prototypes(f, m)
    # 16x16 grid, mask = top half: 4x4 windows -> 8 fg local (+1 global), 2x2 -> 32 fg local (+1 global)
    assert len(p4['fg'][0]) == 9 and len(p2['fg'][0]) == 33
    assert len(p4['bg']) == 8 and len(p2['bg']) == 32
    empty = net.prototypes(f, torch.ones(1, 1, 64, 64))  # no background window: falls back to the global one
    assert len(empty['bg']) == 1


def test_proto_score_softmax_weighted():
    f = torch.randn(1, 8, 4, 4); p = torch.randn(3, 8)
    d = 20 * F.cosine_similarity(f[:, None], p[None, :, :, None, None], dim=2)
    torch.testing.assert_close(proto_score(f, p), (d.softmax(1) * d).sum(1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('cls', [ALPNet, PANet])
def test_softmax_models_inference_api(cls):
    net = cls('small').eval()
    si, sm, qi, qm = episode(1, 2, 3, size=32)
    masks = torch.stack([sm[0], 1 - sm[0]], 1)
    with torch.inference_mode():
        probs = net.segment(net.encode(qi[0]), net.prototypes(net.encode(si[0]), masks), size=(32, 32))
        probs2 = net.predict(si[0], masks, qi[0])
    assert probs.shape == (3, 3, 32, 32)
    torch.testing.assert_close(probs.sum(1), torch.ones(3, 32, 32))
    torch.testing.assert_close(probs, probs2)


def test_bad_batch_shapes():
    with pytest.raises(ValueError, match='sup_imgs'): ADNet('small')(torch.randn(1, 1, 8, 8), torch.zeros(1, 8, 8), torch.randn(1, 1, 8, 8))


def test_head_float32_under_autocast():
    "Under autocast the encoder may run in low precision; the prototype head and the outputs stay float32."
    si, sm, qi, qm = episode(size=32)
    net = ADNet('small')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(si, sm, qi); loss = ADNetLoss()(out, qm)
    assert out['qry'].dtype == torch.float32 and torch.isfinite(loss)
    loss.backward(); assert net.T.grad is not None


def test_cosine_map_gradient_at_a_dead_feature_cell():
    "A feature vector of exactly zero (a dead ReLU cell) has cosine 0 and a finite gradient: training diverged on it once (NaN at step 70)."
    from fsmis.models.adnet import cosine_map
    f = torch.randn(2, 8, 5, 5); f[0, :, 1, 2] = 0; f.requires_grad_()
    p = torch.randn(3, 8)
    c = cosine_map(f, p); c.sum().backward()
    assert torch.isfinite(f.grad).all() and float(c[0, :, 1, 2].abs().max()) == 0.
    torch.testing.assert_close(cosine_map(f.detach(), p), torch.nn.functional.cosine_similarity(f.detach()[:, None], p[None, :, :, None, None], dim=2, eps=1e-8))
    c5 = cosine_map(f, torch.randn(6, 8)); f.grad = None; c5.sum().backward(); assert torch.isfinite(f.grad).all()  # the conv path (many prototypes)
