"""DenseCL pretraining costs: view-pair throughput, step time relative to the encoder, queue memory, peak RSS (CPU).

  views  = view pairs per second and core at --size (two `densecl_views` of a phantom slice, as `ViewPairs`), alone
           and through the fastai DataLoader (collation included); target >= 200
  enc    = the encoder alone doing what any momentum method pays: query forward + key forward (no grad) + backward
  step   = one DenseCL training step: both encoders and heads, dense matching, both InfoNCE terms against the queues,
           backward, SGD step, momentum update, enqueue
  fit    = one iteration of `fit_densecl` (the fastai loop with our callbacks) on a DataLoader repeating one batch
Prints step/enc and fit/enc (min over interleaved repetitions; target <= 1.15), the queue memory and the peak RSS
of a fresh process per configuration.
  --accum  instead: the cost of the paper-batch machinery, one `fit_densecl` step of the same images per step (--bs)
           with gradient accumulation (accum 2: two passes of bs / 2) and shuffle-BN (2 sub-batches) against neither,
           interleaved, min over --reps; prints ms per step and the ratio to the plain step
Usage: python bench/bench_densecl.py [--threads 1] [--reps 5] [--bs 32] [--size 128]
                                     [--configs small:65536:8,resnet18:65536:8,small:4096:8,resnet18:4096:8]
       python bench/bench_densecl.py --accum [--encoders small] [--queue 256] [--threads 1] [--reps 5] [--bs 32] [--size 128]

The runs whose tables the DenseCL lesson (nbs/30_pretrain.densecl.ipynb, "Measurements") shows, all on the 2-core
development machine, one thread, shared with other work:
  2026-12-02  --reps 3 (load average ~1): queues 65 536 and 4 096; views 770 pairs/s alone, 737 through the DataLoader
  2026-12-03  --reps 3 --configs small:256:8,resnet18:256:8 (load average 0.9): the machine ran about twice slower
              than the day before for the encoder alone, and the view throughput fell to 284 pairs/s in the same run
  2026-12-04  --accum --reps 3 --encoders small,resnet18 (load average ~4, so differences under ~10 % are noise)
The lesson's stored offset-recovery run on phantoms (its "Does it work?" section) took 218 s on 2026-12-04; the run of
2026-12-02, with the code of that day, gave 0.0 % (8.4 %) and 0.5 % (8.6 %) for DenseCL and the global-only baseline.
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time
import torch


def views_rate(size, n=400):
    from fsmis.data.phantom import PhantomDataset
    from fsmis.pretrain.densecl import unlabeled_slices, densecl_views, ViewPairs, densecl_dls
    torch.manual_seed(0)
    sl = unlabeled_slices(PhantomDataset(2, shape=(16, 256, 256)))  # slices at 256, cropped and resized to `size`
    vp = ViewPairs(sl, densecl_views(size))
    for i in range(20): vp[i % len(vp)]
    t0 = time.perf_counter()
    for i in range(n): vp[i % len(vp)]
    alone = n / (time.perf_counter() - t0)
    dl = densecl_dls(sl, size, bs=16, device='cpu').train
    t0 = time.perf_counter(); k = 0
    while k < n:
        for b in dl:
            k += 16
            if k >= n: break
    return alone, k / (time.perf_counter() - t0)


class Repeat(torch.utils.data.Dataset):
    def __init__(self, item, n): self.item, self.n = item, n
    def __len__(self): return self.n
    def __getitem__(self, i): return self.item


def one(encoder, queue, grid, bs, size, reps):
    from fastai.data.core import DataLoaders
    from fsmis.pretrain.densecl import DenseCL, DenseCLLoss, densecl_learner, fit_densecl, SliceDL
    torch.manual_seed(0)
    x1, x2 = torch.randn(bs, 1, size, size), torch.randn(bs, 1, size, size)
    model = DenseCL(encoder, queue=queue, grid=grid); loss_f = DenseCLLoss(0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=1e-4)
    enc, enc_k = model.encoder, model.encoder_k

    def enc_step():
        enc.zero_grad(set_to_none=True)
        with torch.no_grad(): enc_k(x2)
        enc(x1).sum().backward()

    def full_step():
        model.momentum_update()
        out = model(x1, x2)
        loss_f(out).backward(); opt.step(); opt.zero_grad(set_to_none=True)
        model.enqueue(out['k_g'], out['k_d'])

    for _ in range(2): enc_step(); full_step()
    te, tf = [], []
    for _ in range(reps):
        for f, ts in ((enc_step, te), (full_step, tf)):
            t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    item = (x1[0], x2[0], torch.tensor(0))
    dl = SliceDL(Repeat(item, max(queue, bs * (2 * reps + 4))), bs, device='cpu')  # as many images as keys: the queue rule keeps `queue`
    dls = DataLoaders(dl, dl, device='cpu'); dls.n_inp = 2
    learn = densecl_learner(dls, encoder, queue=queue, grid=grid, path=tempfile.mkdtemp())
    fit_densecl(learn, 2, total_steps=10**6, progress=False)
    tl = []
    for i in range(reps):
        t0 = time.perf_counter(); fit_densecl(learn, 3 + i, total_steps=10**6, progress=False); tl.append(time.perf_counter() - t0)
    qmem = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.startswith('queue_'))
    return dict(encoder=encoder, queue=queue, grid=grid, bs=bs, size=size, enc_ms=min(te) * 1e3, step_ms=min(tf) * 1e3,
                ratio=min(tf) / min(te), fit_ms=min(tl) * 1e3, fit_ratio=min(tl) / min(te), queue_MiB=qmem / 2**20,
                peak_rss_MiB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def accum_table(encoder, queue, grid, bs, size, reps, steps=2):
    "ms per optimiser step of bs images: plain, accum 2, shuffle-BN 2, both (one learner each, interleaved repetitions)."
    from fastai.data.core import DataLoaders
    from fsmis.pretrain.densecl import densecl_learner, fit_densecl, SliceDL
    torch.manual_seed(0)
    item = (torch.randn(1, size, size), torch.randn(1, size, size), torch.tensor(0))
    cfgs = {'plain': (1, 1), 'accum 2': (2, 1), 'shuffle-BN 2': (1, 2), 'accum 2 + shuffle-BN 2': (2, 2)}
    learners, times = {}, {k: [] for k in cfgs}
    for name, (accum, k) in cfgs.items():
        dl = SliceDL(Repeat(item, max(queue, bs * 4)), bs, device='cpu'); dls = DataLoaders(dl, dl, device='cpu'); dls.n_inp = 2
        learners[name] = l = densecl_learner(dls, encoder, queue=queue, grid=grid, accum=accum, shuffle_bn=k, path=tempfile.mkdtemp())
        fit_densecl(l, 2, total_steps=10**6, progress=False)  # warm-up
    for _ in range(reps):
        for name, l in learners.items():
            t0 = time.perf_counter(); fit_densecl(l, l.iteration + steps, total_steps=10**6, progress=False)
            times[name].append((time.perf_counter() - t0) / steps)
    base = min(times['plain'])
    return [dict(encoder=encoder, config=n, accum=cfgs[n][0], shuffle_bn=cfgs[n][1], bs=bs, size=size, queue=queue,
                 step_ms=min(t) * 1e3, ratio=min(t) / base) for n, t in times.items()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--threads', type=int, default=1); ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--bs', type=int, default=32); ap.add_argument('--size', type=int, default=128)
    ap.add_argument('--configs', default='small:65536:8,resnet18:65536:8,small:4096:8,resnet18:4096:8')
    ap.add_argument('--accum', action='store_true', help='time accumulation and shuffle-BN against a plain step')
    ap.add_argument('--encoders', default='small'); ap.add_argument('--queue', type=int, default=256)
    ap.add_argument('--one', help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.accum:
        print(f"one fit_densecl step of {a.bs} view pairs at {a.size} x {a.size}, queue {a.queue}, grid 8, {a.threads} thread(s), min of {a.reps} interleaved repetitions\n")
        print("| encoder | step | micro-batch x accum | BN sub-batches | ms per step | / plain |"); print("|---|---|---:|---:|---:|---:|")
        for e in a.encoders.split(','):
            for d in accum_table(e, a.queue, 8, a.bs, a.size, a.reps):
                print(f"| {e} | {d['config']} | {a.bs // d['accum']} x {d['accum']} | {d['shuffle_bn']} | {d['step_ms']:.0f} | {d['ratio']:.2f} |", flush=True)
        print(f"\nload average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d')}"); return
    if a.one:
        e, q, g = a.one.split(':')
        print(json.dumps(one(e, int(q), None if g == 'none' else int(g), a.bs, a.size, a.reps))); return
    alone, loader = views_rate(a.size)
    print(f"views at {a.size} x {a.size}, {a.threads} thread(s): {alone:.0f} pairs/s alone, {loader:.0f} pairs/s through the DataLoader (target >= 200)")
    print(f"\n| encoder | queue | grid | bs | enc f+f+b (ms) | step (ms) | step / enc | fit_densecl (ms) | fit / enc | queues (MiB) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in a.configs.split(','):
        r = subprocess.run([sys.executable, __file__, '--one', c, '--threads', str(a.threads), '--reps', str(a.reps),
                            '--bs', str(a.bs), '--size', str(a.size)], capture_output=True, text=True)
        if r.returncode: print(r.stderr[-2000:]); continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {d['encoder']} | {d['queue']} | {d['grid']} | {d['bs']} | {d['enc_ms']:.0f} | {d['step_ms']:.0f} | {d['ratio']:.2f} | "
              f"{d['fit_ms']:.0f} | {d['fit_ratio']:.2f} | {d['queue_MiB']:.0f} | {d['peak_rss_MiB']:.0f} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d')}")


if __name__ == '__main__': main()
