"""Follow a command through the package at run time: which fsmis modules it passes through, in which order of layers,
and how often a call climbs back up to a layer above the caller (the layers of DESIGN.md, top = `cli`).

Usage:
    python tools/routes.py train      # `fsmis train` on built-in phantoms (a few steps)
    python tools/routes.py segment    # `fsmis segment` on phantom NIfTI files with the model `train` wrote
    python tools/routes.py reproduce  # `fsmis reproduce densemp-chaos-setting2` at a tiny budget (needs ../shared/data)
    python tools/routes.py all

A move is a distinct (caller module, callee module) pair seen while the command runs (calls through third-party code,
e.g. fastai running our callbacks, count from the last fsmis module on the stack); a climb is a move whose callee sits
on a higher layer than its caller. Measured with `sys.setprofile`, so it sees what really runs, including imports
made inside functions.
"""
import sys, tempfile, os
from pathlib import Path

# layers of DESIGN.md, bottom (0) to top; modules in one tuple share a layer (a dataset subclass such as the phantoms is
# called back by the `Dataset` base class); a module not listed takes the layer of its package
LAYERS = [('core', 'viz'), 'data.io', ('data', 'data.datasets', 'data.phantom'), 'data.folds', 'data.preprocess', 'data.importers',
          ('data.sv_kernels', 'data.supervoxels'), 'data.augment', 'data.episodes', 'models.encoders', 'models', 'losses',
          'learner', 'eval.metrics', 'eval.inference', 'eval.protocols', 'pretrain', 'config', 'train', 'experiments',
          'ablate', ('label', 'demo'), 'cli']


def layer(mod: str) -> int:
    "Layer index of an fsmis module name (higher = closer to the command line)."
    name = mod.removeprefix('fsmis.').removeprefix('fsmis') or 'core'
    while name:
        for i, l in enumerate(LAYERS):
            if name == l or (isinstance(l, tuple) and name in l): return i
        name = name.rpartition('.')[0]
    return -1


def trace(fn, *args, **kw):
    "(result, modules in order of first visit, set of moves) of calling `fn`."
    seen, moves = [], set()
    def prof(frame, event, arg):
        if event != 'call': return
        mod = frame.f_globals.get('__name__', '')
        if not mod.startswith('fsmis') or mod == 'fsmis._modidx': return
        if mod not in seen: seen.append(mod)
        f = frame.f_back
        while f is not None and not f.f_globals.get('__name__', '').startswith('fsmis'): f = f.f_back
        if f is None: return
        caller = f.f_globals['__name__']
        if caller != mod: moves.add((caller, mod))
    sys.setprofile(prof)
    try: res = fn(*args, **kw)
    finally: sys.setprofile(None)
    return res, seen, moves


def report(name, seen, moves):
    climbs = sorted((a, b) for a, b in moves if layer(b) > layer(a))
    print(f"\n== {name}: {len(seen)} modules, {len(moves)} moves, {len(climbs)} climbs")
    print('   modules: ' + ' > '.join(m.removeprefix('fsmis.') for m in seen))
    for a, b in climbs: print(f"   climb: {a} -> {b}")
    return dict(modules=len(seen), moves=len(moves), climbs=len(climbs))


def _cli(argv):
    from fsmis.cli import main
    rc = main(argv)
    if rc: raise SystemExit(f"fsmis {' '.join(argv)}: exit {rc}")


def route_train(tmp):
    return trace(_cli, ['train', '--dataset', 'phantom', '--steps', '3', '--size', '64', '--checkpoints', f'{tmp}/ck',
                        '--workers', '1', '--quiet', '--device', 'cpu'])


def route_segment(tmp):
    from fsmis.data.datasets import open_dataset
    from fsmis.data.io import write_nifti
    import numpy as np
    if not Path(f'{tmp}/ck/final.pth').is_file(): route_train(tmp)
    ds = open_dataset('phantom')
    for i, cid in enumerate(ds.case_ids[:2]):
        c = ds.load(cid)
        write_nifti(f'{tmp}/img{i}.nii.gz', c.image.astype(np.float32), np.eye(4))
        write_nifti(f'{tmp}/lab{i}.nii.gz', c.label.astype(np.uint8), np.eye(4))
    return trace(_cli, ['segment', f'{tmp}/img1.nii.gz', f'{tmp}/img0.nii.gz', f'{tmp}/lab0.nii.gz', '--checkpoint',
                        f'{tmp}/ck/final.pth', '--out', f'{tmp}/pred.nii.gz', '--device', 'cpu'])


def route_reproduce(tmp):
    "DenseMP Setting 2 on CHAOS at a tiny budget: 2 DenseCL steps, a few seconds of stage 2, 2 steps of stage 3."
    import fsmis.config as C
    C.DENSEMP_BUDGETS['cpu'] = dict(finetune_steps=2)  # this measurement only: stage 3 of the cpu budget is 1000 steps
    return trace(_cli, ['reproduce', 'densemp-chaos-setting2', '--minutes', '0.02', '--pretrain-steps', '2', '--folds', '0',
                        '--out', f'{tmp}/rep', '--device', 'cpu'])


if __name__ == '__main__':
    which = sys.argv[1:] or ['all']
    if which == ['all']: which = ['train', 'segment', 'reproduce']
    os.environ.setdefault('FSMIS_CACHE', tempfile.mkdtemp())
    with tempfile.TemporaryDirectory() as tmp:
        for w in which:
            _, seen, moves = {'train': route_train, 'segment': route_segment, 'reproduce': route_reproduce}[w](tmp)
            report(w, seen, moves)
