"""Cost of an ADNet3D training step (ADNet Section 5.4) relative to its 3D encoder alone, and its peak memory.

On one episode of random patches (1 support + 1 query patch of DEPTH x H x W, a cube-shaped supervoxel mask):
  enc   = 3D encoder forward + backward of the 2 patches (the floor: any method on this encoder pays it)
  step  = ADNet3D forward (3D prototype, anomaly score, PAR) + L_S + L_T + L_PAR + backward + SGD step
and prints the times (min over interleaved repetitions), step/enc (target <= 1.15) and the peak memory of one step
(CUDA: torch.cuda.max_memory_allocated; CPU: the growth of the process's peak RSS over the first step, ru_maxrss).
Usage: python bench/bench_adnet3d.py [--threads 1] [--reps 5] [--configs resnext3d-small:10x108,resnext3d-small:10x215]
       (the paper's network: --configs resnext3d-101:10x215 --device cuda)
"""
import argparse, os, resource, time
import torch
from fsmis.models.adnet3d import ADNet3D
from fsmis.losses import ADNetLoss


def peak_rss_mb() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(name, depth, size, reps, device):
    torch.manual_seed(0)
    dev = torch.device(device)
    si, qi = torch.randn(1, 1, 1, depth, size, size, device=dev), torch.randn(1, 1, 1, depth, size, size, device=dev)
    sm = torch.zeros(1, 1, depth, size, size, device=dev); sm[..., depth // 4: 3 * depth // 4 + 1, size // 4: size // 2, size // 3: 2 * size // 3] = 1
    qm = sm.long()
    model = ADNet3D(name, window=depth).to(dev); loss_f = ADNetLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x = torch.cat([si.flatten(0, 1), qi.flatten(0, 1)])
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)

    def enc_step():
        model.zero_grad(set_to_none=True)
        model.encoder(x).sum().backward()

    def full_step():
        loss = loss_f(model(si, sm, qi), qm)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    rss0 = peak_rss_mb()
    if dev.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    full_step(); sync()
    mem = torch.cuda.max_memory_allocated() / 2**20 if dev.type == 'cuda' else peak_rss_mb() - rss0
    enc_step(); full_step(); sync()  # warm-up
    te, tf = [], []
    for _ in range(reps):  # interleaved, so load from other processes hits both alike
        for f, ts in ((enc_step, te), (full_step, tf)):
            sync(); t0 = time.perf_counter(); f(); sync(); ts.append(time.perf_counter() - t0)
    return dict(enc_ms=min(te) * 1e3, step_ms=min(tf) * 1e3, ratio=min(tf) / min(te), mem_mb=mem,
                params_m=sum(p.numel() for p in model.parameters()) / 1e6)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    ap.add_argument('--reps', type=int, default=5, help='timed repetitions (min)')
    ap.add_argument('--configs', default='resnext3d-small:10x108,resnext3d-small:10x215', help='encoder:DEPTHxSIZE list')
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.device}, {a.threads} CPU thread(s), min of {a.reps} interleaved repetitions, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'encoder':16} {'patch':>10} {'weights M':>9} {'enc f+b ms':>10} {'step ms':>9} {'step/enc':>8} {'peak MB':>8}")
    for cfg in a.configs.split(','):
        name, shape = cfg.split(':'); depth, size = (int(v) for v in shape.split('x'))
        r = bench(name, depth, size, a.reps, a.device)
        print(f"{name:16} {f'{depth}x{size}x{size}':>10} {r['params_m']:9.2f} {r['enc_ms']:10.1f} {r['step_ms']:9.1f} {r['ratio']:8.3f} {r['mem_mb']:8.0f}", flush=True)


if __name__ == '__main__': main()
