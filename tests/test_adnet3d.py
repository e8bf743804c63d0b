"ADNet's one-step 3D variant (Table 8) from outside: encoders, training with exact resume, checkpoints, EP2 / EP2-all, `fsmis` commands, the ablation, bad input."
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from fsmis.cli import main
from fsmis.config import ExperimentConfig, reproduce_config
from fsmis.data.io import read_nifti, write_nifti
from fsmis.learner import read_checkpoint, load_model, save_model, build_model

PATCH = [6, 40, 40]


from test_cli import run_main, one_line_error  # the command-line helpers of the CLI tests (tests/ is on the path)


@pytest.fixture(scope='module')
def phantom_folder(tmp_path_factory):
    "Six small phantom cases (12 slices of 48 x 48) as image_<id>/label_<id> NIfTI files."
    from fsmis.data.phantom import PhantomDataset
    d = tmp_path_factory.mktemp('phantom3d')
    PhantomDataset(n_cases=6, seed=3, shape=(12, 48, 48), spacing=(4., 4., 4.)).to_folder(d)
    return d


def _cfg(folder, **kw):
    d = dict(dataset=str(folder), method='adnet3d', encoder='resnext3d-small', n_steps=4, rho=300, device='cpu',
             dls_kw={'patch': PATCH, 'min_voxels': 50}, folds=[0], runs=1, n_folds=3, protocols=['EP2', 'EP2-all'], baselines=[])
    d.update(kw)
    return ExperimentConfig(**d)


@pytest.fixture(scope='module')
def trained(phantom_folder, tmp_path_factory):
    "`fsmis train --method adnet3d` on the phantom folder: the checkpoint folder."
    ck = tmp_path_factory.mktemp('ck3d')
    cfg = _cfg(phantom_folder); cfg.save(ck/'in.yaml')
    code = main(['train', '--config', str(ck/'in.yaml'), '--checkpoints', str(ck/'run'), '--quiet', '--workers', '1'])
    assert code in (0, None)
    return ck/'run'


def test_encoders_follow_table9():
    from fsmis.models.encoders3d import make_encoder3d
    big = make_encoder3d('resnext3d-101')
    n = sum(p.numel() for p in big.parameters()) - big.proj.weight.numel()
    assert abs(n / 1e6 - 47.52) < 0.005  # Table 8's count for the trunk
    assert big.layer1[0].conv2.groups == 32 and big.layer4[-1].conv3.out_channels == 2048 and big.proj.out_channels == 256
    strides = [blk.conv2.stride for layer in (big.layer1, big.layer2, big.layer3, big.layer4) for blk in layer[:1]]
    assert strides == [(1, 1, 1), (1, 2, 2), (1, 1, 1), (1, 1, 1)]  # conv2..conv5; z never strided
    small = make_encoder3d('resnext3d-small').eval()
    with torch.no_grad(): assert small(torch.randn(1, 1, 10, 108, 108)).shape == (1, 128, 10, 14, 14)


def test_train_writes_a_3d_checkpoint(trained):
    ck = read_checkpoint(trained/'final.pth')
    assert ck['model_kind'] == 'adnet3d' and ck['dims'] == 3 and ck['patch'] == PATCH and ck['iteration'] == 4
    assert ck['model_config']['window'] == PATCH[0] and ck['model_config']['encoder'] == 'resnext3d-small'
    m = load_model(trained/'final.pth', 'cpu')
    assert type(m).__name__ == 'ADNet3D' and m.window == PATCH[0] and m.fsmis_meta['dims'] == 3


def test_exact_resume(phantom_folder, tmp_path):
    "Stop at step 2 and resume to 4: the weights equal those of an uninterrupted run of 4 steps."
    from fsmis.data.datasets import open_dataset
    from fsmis.train import train_fold
    ds = open_dataset(str(phantom_folder))
    ids = ds.case_ids[:4]
    full = train_fold(_cfg(phantom_folder), ds, ids, n_workers=1).model.state_dict()
    ck = tmp_path/'ck'
    train_fold(_cfg(phantom_folder, n_steps=2), ds, ids, ckpt_dir=ck, ckpt_every=1, n_workers=1)
    res = train_fold(_cfg(phantom_folder), ds, ids, ckpt_dir=ck, ckpt_every=1, resume='last', n_workers=1)
    assert res.iteration == 4
    for k, v in full.items(): assert torch.equal(v, res.model.state_dict()[k]), k


def test_evaluate_k_one_and_k_all(trained, phantom_folder, capsys):
    out = trained.parent/'ev'
    rows = {}
    for proto in ('EP2', 'EP2-all'):
        code, so, err = run_main(capsys, 'evaluate', trained/'final.pth', '--protocol', proto, '--dataset', phantom_folder,
                                 '--folds', 0, '--out', out/proto, '--quiet')
        assert code in (0, None), err
        import pandas as pd
        rows[proto] = pd.read_csv(out/proto/'results.csv')
    for df in rows.values(): assert len(df) and df.dice.between(0, 1).all()
    a, b = rows['EP2'], rows['EP2-all']
    assert (a.n_slices == b.n_slices).all()  # both score every query slice (EP2)
    from fsmis.eval.inference import encode_volume3d, predict_tasks3d, Task
    from fsmis.core import labelled_slices, support_slice
    m = load_model(trained/'final.pth', 'cpu')
    img = read_nifti(phantom_folder/'image_2.nii.gz')[0]; img = (img - img.mean()) / img.std()
    lab = read_nifti(phantom_folder/'label_2.nii.gz', dtype=None)[0].astype(np.int64)
    qf = encode_volume3d(m, img)
    k1 = predict_tasks3d(m, qf, img.shape[1:], img, lab, [Task(1, [support_slice(lab, cls=1)], np.arange(len(img)))], scores=True)
    ka = predict_tasks3d(m, qf, img.shape[1:], img, lab, [Task(1, list(labelled_slices(lab, 1)), np.arange(len(img)))], scores=True)
    assert not np.allclose(k1[1], ka[1])  # one prototype from all labelled slices differs from the middle slice's


def test_segment_with_a_3d_checkpoint(trained, phantom_folder, tmp_path, capsys):
    q, s, m = phantom_folder/'image_1.nii.gz', phantom_folder/'image_2.nii.gz', phantom_folder/'label_2.nii.gz'
    for k in ('one', 'all'):
        out = tmp_path/f'pred_{k}.nii.gz'
        code, so, err = run_main(capsys, 'segment', q, s, m, '--checkpoint', trained/'final.pth', '--out', out,
                                 '--support-slices', k, '--device', 'cpu')
        assert code in (0, None), err
        pred, sp, aff = read_nifti(out, dtype=None); img, sp0, aff0 = read_nifti(q)
        assert pred.shape == img.shape and np.allclose(aff, aff0)  # the query's grid
        assert set(np.unique(pred)) <= {0, 1, 2, 3, 4}


def test_bad_input_thin_volume(trained, phantom_folder, tmp_path, capsys):
    "A volume with fewer slices than the window: one clear error (sampler, inference, CLI)."
    from fsmis.core import Case
    from fsmis.data.episodes import VSSL3DSampler
    from fsmis.eval.inference import segment_volume3d
    img, sp, aff = read_nifti(phantom_folder/'image_1.nii.gz')
    lab = read_nifti(phantom_folder/'label_1.nii.gz', dtype=None)[0]
    thin = img[:4]
    write_nifti(tmp_path/'thin.nii.gz', thin, aff)
    code, _, err = run_main(capsys, 'segment', tmp_path/'thin.nii.gz', phantom_folder/'image_2.nii.gz', phantom_folder/'label_2.nii.gz',
                            '--checkpoint', trained/'final.pth', '--out', tmp_path/'p.nii.gz', '--device', 'cpu')
    assert code == 2 and 'fewer than the window of 6 slices' in one_line_error(err, 'segment')
    assert not (tmp_path/'p.nii.gz').exists()
    m = load_model(trained/'final.pth', 'cpu')
    with pytest.raises(ValueError, match='fewer than the window'): segment_volume3d(m, thin, img, lab)
    case = Case(thin, lab[:4].astype(np.int64), spacing=(4., 4., 4.), case_id='thin')
    with pytest.raises(ValueError, match="case 'thin' has 4 slices, fewer than the patch depth 6"):
        VSSL3DSampler([case], [np.ones(thin.shape, np.int32)], patch=PATCH)


def test_bad_input_support_without_labels(trained, phantom_folder, tmp_path, capsys):
    "A support with no labelled slice (of a class): one clear error each way in."
    from fsmis.eval.protocols import ep2_all_tasks, ep2_tasks
    from fsmis.eval.inference import segment_volume3d
    img, _, aff = read_nifti(phantom_folder/'image_2.nii.gz')
    write_nifti(tmp_path/'empty.nii.gz', np.zeros(img.shape, np.uint8), aff)
    code, _, err = run_main(capsys, 'segment', phantom_folder/'image_1.nii.gz', phantom_folder/'image_2.nii.gz', tmp_path/'empty.nii.gz',
                            '--checkpoint', trained/'final.pth', '--support-slices', 'all', '--out', tmp_path/'p.nii.gz', '--device', 'cpu')
    assert code == 2 and 'empty' in one_line_error(err, 'segment')
    empty = np.zeros((12, 8, 8), np.int64)
    for f in (ep2_tasks, ep2_all_tasks):
        with pytest.raises(ValueError, match='no slice with class 3'): f(empty, empty, 3)
    m = load_model(trained/'final.pth', 'cpu')
    with pytest.raises(ValueError, match='no labelled voxel'): segment_volume3d(m, img, img, empty[:, :1, :1].repeat(48, 1).repeat(48, 2))
    lab = read_nifti(phantom_folder/'label_2.nii.gz', dtype=None)[0].astype(np.int64)
    with pytest.raises(ValueError, match='class 9: the support mask has no slice'): segment_volume3d(m, img, img, lab, classes=[9])


def test_bad_input_2d_where_3d_and_back(trained, phantom_folder, tmp_path, capsys):
    "A 2D checkpoint where a 3D one is needed, and a 3D one (or encoder) where a 2D one is: one clear error each."
    from fsmis.data.phantom import toy_dls
    from fsmis.learner import adnet_learner, save_checkpoint
    from fsmis.eval.inference import encode_volume, predict_tasks3d, segment_volume, encode_volume3d
    from fsmis.train import init_state
    learn = adnet_learner(toy_dls(2, 32), 'small', path=tmp_path)
    ck2d = save_checkpoint(learn, tmp_path/'adnet2d.pth')
    q, s, m = phantom_folder/'image_1.nii.gz', phantom_folder/'image_2.nii.gz', phantom_folder/'label_2.nii.gz'
    code, _, err = run_main(capsys, 'segment', q, s, m, '--checkpoint', ck2d, '--support-slices', 'all', '--out', tmp_path/'p.nii.gz', '--device', 'cpu')
    assert code == 2 and 'needs a 3D (volume) model' in one_line_error(err, 'segment')
    m2, m3 = learn.model.eval(), load_model(trained/'final.pth', 'cpu')
    vol = np.zeros((12, 48, 48), np.float32)
    with pytest.raises(ValueError, match=r'needs a 3D \(volume\) model'): encode_volume3d(m2, vol)
    with pytest.raises(ValueError, match=r'needs a 2D \(slice\) model; got a 3D adnet3d'): encode_volume(m3, vol)
    with pytest.raises(ValueError, match=r'needs a 2D \(slice\) model'): segment_volume(m3, vol, vol[:1], np.ones((1, 48, 48), int))
    with pytest.raises(ValueError, match='a adnet checkpoint, but the method is .adnet3d.'):
        init_state(_cfg(phantom_folder, init_weights=str(ck2d)))
    with pytest.raises(ValueError, match='a adnet3d checkpoint, but the method is .adnet.'):
        init_state(ExperimentConfig(method='adnet', init_weights=str(trained/'final.pth')))
    with pytest.raises(ValueError, match='needs a 3D encoder'): build_model('adnet3d', encoder='small')
    with pytest.raises(ValueError, match="is a 3D encoder: it belongs to the 3D model"): build_model('adnet', encoder='resnext3d-small')
    code, _, err = run_main(capsys, 'train', '--method', 'adnet3d', '--encoder', 'resnet18', '--dataset', phantom_folder,
                            '--checkpoints', tmp_path/'x', '--steps', 1, '--quiet')
    assert code == 2 and 'needs a 3D encoder' in one_line_error(err, 'train')


def test_reproduce_configs_and_table8():
    for ds in ('chaos', 'cmr'):
        cpu, paper = reproduce_config(f'adnet3d-{ds}', 'cpu'), reproduce_config(f'adnet3d-{ds}', 'paper')
        assert (cpu.method, cpu.encoder, cpu.size, cpu.dls_kw['patch']) == ('adnet3d', 'resnext3d-small', 128, [10, 108, 108])
        assert (paper.encoder, paper.size, paper.dls_kw['patch']) == ('resnext3d-101', None, [10, 215, 215])
        assert paper.protocols == ['EP2', 'EP2-all']
    assert reproduce_config('adnet3d-chaos', 'paper').n_steps == 50_000 and reproduce_config('adnet3d-cmr', 'paper').n_steps == 15_000
    from fsmis.ablate import ablation_cells, get_ablation, paper_table
    a = get_ablation('adnet-table8')
    cells = ablation_cells(a)
    assert [c.cfg.method for c in cells] == ['adnet', 'adnet3d'] and cells[1].cfg.protocols == ['EP2', 'EP2-all']
    assert '79.58 ± 7.67' in paper_table(a) and '72.41 ± 9.96' in paper_table(a)


def test_table8_cells_read_back(tmp_path):
    "The k = all row comes from the 3D cell's EP2-all rows, shown in the EP2 table next to k = one."
    import pandas as pd
    from fsmis.ablate import ablation_cells, ablation_tables, get_ablation
    a = get_ablation('adnet-table8')
    for c in ablation_cells(a):
        d = tmp_path/c.folder; d.mkdir()
        c.cfg.save(d/'config.yaml')
        rows = [dict(case=q, support='9', cls=1, **{'class': 'liver'}, protocol=p, threshold=-10., tp=tp, fp=5, fn=5, dice=2*tp/(2*tp+10),
                     n_slices=30, method=c.cfg.method, fold=0, run=0, seed=0, threshold_sweep=False)
                for q in ('1', '2') for p, tp in [(p, 10 if p == 'EP2' else 40) for p in c.cfg.protocols]]
        pd.DataFrame(rows).to_csv(d/'results.csv', index=False)
        (d/'done.json').write_text(json.dumps(dict(index=c.index, row=c.row, fold=0, run=0)))
    t = ablation_tables(a, tmp_path)
    assert list(t) == ['EP2']
    line = [l for l in t['EP2'].splitlines() if l.startswith('| 3D ResNeXt-101, k = all')][0]
    assert '88.89' in line  # the EP2-all rows (2 x 40 / (80 + 10)) shown as k = all, in the EP2 table
