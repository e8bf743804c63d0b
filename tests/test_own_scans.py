"Scans as users have them: any orientation or axis order, other spacings, extreme voxels, many queries (`fsmis segment`)."
import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from fsmis.data.io import read_nifti, write_nifti, slice_plane, spacing_to_affine, zhw_to_nifti
from fsmis.data.phantom import make_phantom

ORIENTATIONS = [('L', 'A', 'S'), ('R', 'A', 'S'), ('L', 'P', 'I'), ('R', 'P', 'S'), ('S', 'R', 'A'), ('A', 'I', 'L'), ('P', 'L', 'I')]


def _tiny_model(seed=0, **meta):
    from fsmis.learner import build_model
    torch.manual_seed(seed); torch.set_num_threads(1)
    m = build_model('adnet', encoder='small').eval()
    m.fsmis_meta.update(meta)
    return m


def _store(path, zhw, affine, codes):
    "Save the canonical (z, h, w) array `zhw` (affine `affine`) as the same scan stored with axis codes `codes`."
    img = nib.Nifti1Image(np.ascontiguousarray(zhw_to_nifti(zhw)), affine)
    t = ornt_transform(io_orientation(affine), axcodes2ornt(codes))
    other = img.as_reoriented(t)
    other.set_qform(other.affine, code=1); other.set_sform(other.affine, code=1)
    nib.save(other, str(path))
    assert nib.aff2axcodes(other.affine) == codes
    return path


def _canonical(path):
    "A written label map brought to L, A, S by nibabel alone (independent of fsmis' reader)."
    img = nib.load(str(path))
    t = ornt_transform(io_orientation(img.affine), axcodes2ornt(('L', 'A', 'S')))
    return np.asarray(img.as_reoriented(t).dataobj)


@pytest.fixture(scope='module')
def pair():
    sup, qry = make_phantom(1, (10, 48, 48)), make_phantom(2, (10, 48, 48))
    return sup, qry


@pytest.mark.parametrize('codes', ORIENTATIONS)
def test_reader_gives_one_canonical_array(tmp_path, pair, codes):
    "Any storage order of an axial scan reads as the same (z, h, w) array, spacing and world geometry."
    _, q = pair
    p = _store(tmp_path/'q.nii.gz', q.image, q.affine, codes)
    arr, sp, aff = read_nifti(p)
    np.testing.assert_array_equal(arr, q.image)
    np.testing.assert_allclose(sp, q.spacing); np.testing.assert_allclose(aff, q.affine, atol=1e-6)
    assert slice_plane(aff) == 'axial'
    # written back `like` the file: its own layout, voxel for voxel, affine and header kept
    write_nifti(tmp_path/'w.nii.gz', arr, like=p)
    a, b = nib.load(str(p)), nib.load(str(tmp_path/'w.nii.gz'))
    np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
    np.testing.assert_allclose(b.affine, a.affine); assert b.header['qform_code'] == a.header['qform_code'] == 1
    np.testing.assert_allclose(b.header.get_zooms(), a.header.get_zooms())


def test_segmentations_agree_across_orientations(tmp_path, pair):
    "One query stored in several orientations and axis orders: the written label maps agree voxel for voxel once reoriented."
    from fsmis.eval.inference import segment_files
    sup, q = pair
    model = _tiny_model()
    write_nifti(tmp_path/'s.nii.gz', sup.image, sup.affine); write_nifti(tmp_path/'m.nii.gz', sup.label, sup.affine)
    maps = {}
    for codes in ORIENTATIONS:
        tag = ''.join(codes)
        qp = _store(tmp_path/f'q_{tag}.nii.gz', q.image, q.affine, codes)
        segment_files(model, qp, tmp_path/'s.nii.gz', tmp_path/'m.nii.gz', tmp_path/f'p_{tag}.nii.gz')
        out, src = nib.load(str(tmp_path/f'p_{tag}.nii.gz')), nib.load(str(qp))
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)  # the query's own grid
        maps[tag] = _canonical(tmp_path/f'p_{tag}.nii.gz')
    ref = maps['LAS']
    assert ref.any() and len(np.unique(ref)) > 2  # a multi-class map, not an empty one
    for tag, m in maps.items(): np.testing.assert_array_equal(m, ref, err_msg=tag)


def test_support_in_another_orientation_segments_as_when_they_match(tmp_path, pair):
    "Support image and mask stored otherwise than the query (and than each other): the same label map as a matching pair."
    from fsmis.eval.inference import segment_files
    sup, q = pair
    model = _tiny_model()
    write_nifti(tmp_path/'q.nii.gz', q.image, q.affine)
    write_nifti(tmp_path/'s.nii.gz', sup.image, sup.affine); write_nifti(tmp_path/'m.nii.gz', sup.label, sup.affine)
    segment_files(model, tmp_path/'q.nii.gz', tmp_path/'s.nii.gz', tmp_path/'m.nii.gz', tmp_path/'same.nii.gz')
    same = nib.load(str(tmp_path/'same.nii.gz')).get_fdata()
    for sc, mc in [(('R', 'P', 'I'), ('R', 'P', 'I')), (('S', 'R', 'A'), ('L', 'P', 'S'))]:
        _store(tmp_path/'s2.nii.gz', sup.image, sup.affine, sc); _store(tmp_path/'m2.nii.gz', sup.label, sup.affine, mc)
        segment_files(model, tmp_path/'q.nii.gz', tmp_path/'s2.nii.gz', tmp_path/'m2.nii.gz', tmp_path/'other.nii.gz')
        np.testing.assert_array_equal(nib.load(str(tmp_path/'other.nii.gz')).get_fdata(), same)


def test_thick_non_axial_series_kept_and_refused_against_axial(tmp_path, pair):
    "A thick-slice sagittal series keeps its plane (not resliced); segmenting it from an axial support is refused in one line."
    from fsmis.eval.inference import segment_files
    sup, q = pair
    write_nifti(tmp_path/'s.nii.gz', sup.image, sup.affine); write_nifti(tmp_path/'m.nii.gz', sup.label, sup.affine)
    sag = np.array([[0, 0, 5., 0], [1.5, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])  # slices 5 mm apart along left-right
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((48, 10, 12), np.float32), sag), str(tmp_path/'sag.nii.gz'))
    arr, sp, aff = read_nifti(tmp_path/'sag.nii.gz')
    assert arr.shape == (12, 10, 48) and sp == (5.0, 1.5, 1.5) and slice_plane(aff) == 'sagittal'
    with pytest.raises(ValueError, match='sagittal slices, but the support .* axial'):
        segment_files(_tiny_model(), tmp_path/'sag.nii.gz', tmp_path/'s.nii.gz', tmp_path/'m.nii.gz', tmp_path/'o.nii.gz')
    assert not (tmp_path/'o.nii.gz').exists()


def test_canonical_frame_is_the_phantoms_and_spacing_to_affines():
    assert nib.aff2axcodes(spacing_to_affine((4., 1.5, 1.5))) == ('L', 'A', 'S')
    assert nib.aff2axcodes(make_phantom(0, (4, 16, 16)).affine) == ('L', 'A', 'S')


@pytest.mark.data
def test_shared_data_reads_as_stored(data_root):
    "The shared preprocessed scans (CHAOS: L, A, S; cardiac: oblique short-axis stacks) read exactly as the plain transpose."
    files = sorted(data_root.glob('*/image_*.nii.gz')) + sorted(data_root.glob('*/label_*.nii.gz'))
    assert len(files) >= 100
    for f in files:
        img = nib.load(str(f))
        arr, sp, aff = read_nifti(f, dtype=None)
        np.testing.assert_array_equal(arr, np.asanyarray(img.dataobj).transpose(2, 1, 0), err_msg=str(f))
        np.testing.assert_allclose(aff, img.affine)
    assert slice_plane(read_nifti(data_root/'chaos_t2'/'image_1.nii.gz')[2]) == 'axial'
