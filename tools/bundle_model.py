"""Make the model that ships in the wheel from a `fsmis train` checkpoint: keep the weights and the metadata that
`fsmis.learner.load_model` needs, drop the optimizer and RNG states, and add the data's license and attribution.
Usage: python tools/bundle_model.py CHECKPOINT [--wall-min M] [--out fsmis/weights/adnet_chaos_t2_small.pth]
The model card (nbs/53_label.ipynb, "The bundled model") gives the commands that made the shipped file."""
import argparse, sys
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
LICENSE = 'CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/)'
ATTRIBUTION = ('Trained on CHAOS (Combined Healthy Abdominal Organ Segmentation, ISBI 2019, task 5: T2-SPIR MRI), '
               'A. E. Kavur et al., "CHAOS Challenge - combined (CT-MR) healthy abdominal organ segmentation", '
               'Medical Image Analysis 69, 2021, https://doi.org/10.1016/j.media.2020.101950; data: '
               'https://doi.org/10.5281/zenodo.3431873, CC BY-SA 4.0. Self-supervised: no CHAOS label was used in '
               'training. These weights are shared under the same license.')

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('checkpoint'); p.add_argument('--wall-min', type=float, default=None, help='training wall time (minutes)')
    p.add_argument('--out', default=str(ROOT/'fsmis'/'weights'/'adnet_chaos_t2_small.pth'))
    a = p.parse_args(argv)
    ck = torch.load(a.checkpoint, map_location='cpu', weights_only=True)
    if ck.get('dataset') != 'chaos_t2': sys.exit(f"{a.checkpoint}: trained on {ck.get('dataset')!r}; only CHAOS T2 models are bundled")
    keep = ('model', 'model_kind', 'model_config', 'size', 'classes', 'dataset', 'fold', 'n_folds', 'fold_variant', 'iteration', 'schedule')
    out = {k: ck[k] for k in keep if k in ck}
    from fsmis.data.datasets import open_dataset
    from fsmis.data.folds import fold_split
    ds = open_dataset('chaos_t2')
    sp = fold_split(ds.case_ids, ck['fold'], ck.get('n_folds', 5), ck.get('fold_variant', 'adnet'))
    out.update(license=LICENSE, attribution=ATTRIBUTION,
               training=dict(method='ADNet, self-supervised (supervoxel pseudo-labels; no labels used)', steps=int(ck['iteration']),
                             wall_minutes=a.wall_min, train_case_ids=list(sp.train_ids), held_out_case_ids=[sp.support_id, *sp.query_ids]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, a.out)
    print(f"{a.out}: {Path(a.out).stat().st_size / 1e6:.2f} MB, {out['iteration']} steps, trained on {' '.join(sp.train_ids)}")

if __name__ == '__main__': main()
