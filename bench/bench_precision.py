"""Training step time of every stage in float32 against bfloat16 autocast + channels-last (`precision='bf16'`), one CPU thread.

    python bench/bench_precision.py [--size 128] [--steps 20] [--reps 3] [--encoders small resnet18]
                                    [--stages adnet alpnet panet ppnet canet senet densecl]

For each stage and encoder: the median time of one training step (`fit_iters` of the stage's learner on 1-shot toy
episodes: episode drawing, forward, losses, backward, SGD, callbacks; DenseCL: `fit_densecl` on phantom slices, 8 view
pairs per step) in each precision, measured in alternating order; the ratio bf16 / fp32 (target: <= 0.45 for the small
encoder at 128 px); and step / encoder forward+backward of the same images in the same precision (target <= 1.15; for
SE-Net, which has no backbone, its whole network). DenseMP's stages 2 and 3 are the `alpnet` learner (on superpixel
and ground-truth episodes: the same step). Prints the CPU's bf16 flags: without AMX or AVX-512 BF16, bf16 is emulated.
"""
import argparse, contextlib, statistics, tempfile, time
import torch
from fsmis.data.phantom import toy_dls, PhantomDataset
from fsmis.learner import LEARNERS, fit_iters, cpu_has_bf16


def _timed(step, steps):
    ts = []
    for i in range(steps):
        t0 = time.perf_counter(); step(i); ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


def stage_ms(stage, encoder, precision, size, steps, seed=0):
    "(median ms per training step, median ms of the encoder's forward + backward on the step's images), 3 warm-up steps."
    torch.manual_seed(seed)
    ac = torch.autocast('cpu', dtype=torch.bfloat16) if precision == 'bf16' else contextlib.nullcontext()
    if stage == 'densecl':
        from fsmis.pretrain.densecl import densecl_learner, densecl_dls, fit_densecl, unlabeled_slices
        sl = unlabeled_slices(PhantomDataset(2, shape=(16, size, size)))
        learn = densecl_learner(densecl_dls(sl, size, bs=8, device='cpu'), encoder, queue=32, grid=4, precision=precision, path=tempfile.mkdtemp())
        fit_densecl(learn, 3, total_steps=10**6, progress=False)
        step = lambda i: fit_densecl(learn, 4 + i, progress=False)
        x = learn.dls.train.one_batch()[0]; net = learn.model.encoder; x = torch.cat([x, x])  # query and key views
    else:
        learn = LEARNERS[stage](toy_dls(1000, size), encoder, lr=1e-3, precision=precision)
        fit_iters(learn, 3, progress=False)
        step = lambda i: fit_iters(learn, 4 + i, progress=False)
        si, sm, qi = learn.dls.train.one_batch()[:3]
        x = torch.cat([si.flatten(0, 1), qi.flatten(0, 1)]); net = learn.model.encoder
        if stage == 'senet': net = lambda _: learn.model(si, sm, qi)['qry']  # no backbone: the whole network
    if precision != 'fp32': x = x.contiguous(memory_format=torch.channels_last)
    def enc(i):
        learn.model.zero_grad(set_to_none=True)
        with ac: y = net(x)
        y.float().sum().backward()
    return _timed(step, steps), _timed(enc, steps)


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--size', type=int, default=128); ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--reps', type=int, default=3); ap.add_argument('--encoders', nargs='+', default=['small', 'resnet18'])
    ap.add_argument('--stages', nargs='+', default=['adnet', 'alpnet', 'panet', 'ppnet', 'canet', 'senet', 'densecl'])
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"CPU bf16 (AMX or AVX-512 BF16): {cpu_has_bf16()}; torch {torch.__version__}; 1 thread; {a.size} px; {a.steps} steps x {a.reps} reps")
    print("| stage | encoder | fp32 step (ms) | bf16 step (ms) | bf16 / fp32 | fp32 step / enc f+b | bf16 step / enc f+b |\n|---|---|---:|---:|---:|---:|---:|")
    for stage in a.stages:
        for enc in a.encoders:
            if stage == 'senet' and enc != 'small': continue  # SE-Net has no backbone to choose
            r = {'fp32': [], 'bf16': []}
            for rep in range(a.reps):  # alternate the order so that load drifts hit both
                for p in (['fp32', 'bf16'] if rep % 2 == 0 else ['bf16', 'fp32']): r[p].append(stage_ms(stage, enc, p, a.size, a.steps))
            (f, fe), (b, be) = [tuple(statistics.median(v[i] for v in r[p]) for i in (0, 1)) for p in ('fp32', 'bf16')]
            print(f"| {stage} | {enc} | {f:.0f} | {b:.0f} | {b / f:.2f} | {f / fe:.2f} | {b / be:.2f} |", flush=True)
