"""What the two settings of `diagssm.cpu.fast_cpu_settings()` are worth on this machine.

    python benchmarks/bench_cpu.py                  # both cases, (16, 16384, 128) float32 tensors
    python benchmarks/bench_cpu.py --shape 4 1024 128 --repeats 3

- denormals: ms of one elementwise multiply-add over a tensor of denormal floats (1e-40, what decaying
  states reach), in a subprocess with torch.set_flush_denormal(False) and one with (True), each set
  before torch's threads start (and the share of outputs still denormal: 0% where it took effect);
  many x86 CPUs handle denormals in slow microcode unless they are flushed to zero, some (the AVX2
  machine of the README) at full speed.
- huge pages: ms of `clone()` of the tensor (fresh memory each time, so its page faults), in a
  subprocess with THP_MEM_ALLOC_ENABLE=0 and one with =1 (libc10 reads it at its first allocation,
  so each setting needs its own process).

Each figure is the median of --repeats after one warm-up, on --threads threads.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

from diagssm.bench import median_ms


def denormal_case(shape, repeats):
    """(ms, share) of y = 0.5 x + x over x of denormals (into a preallocated y: no page faults in the
    timing), in this process as it is set, and the share of y's entries left denormal (0 where
    flushing took effect on every thread)."""
    x, y = torch.full(shape, 1e-40), torch.empty(shape)
    ms = median_ms(lambda: torch.add(x, x, alpha=0.5, out=y), repeats, warmup=1)
    return ms, ((y != 0) & (y.abs() < torch.finfo(torch.float32).tiny)).float().mean().item()


def clone_ms(shape, repeats):
    x = torch.randn(shape)
    return median_ms(lambda: x.clone(), repeats, warmup=1)


def in_process(case, shape, repeats, threads, thp="1", flush=False):
    """`case`(shape, repeats) in a fresh process with THP_MEM_ALLOC_ENABLE=thp (libc10 reads it at its
    first allocation) and denormals flushed or not, set before torch's threads start (each thread
    keeps the setting of the thread that started it: set later, only the calling thread flushes).
    None where this CPU cannot flush denormals."""
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
    code = ("import json, sys, torch; sys.path.insert(0, sys.argv[1]); import bench_cpu as b; "
            "flush = sys.argv[6] == '1'; ok = torch.set_flush_denormal(flush) or not flush; "
            "torch.set_num_threads(int(sys.argv[4])); "
            "print(json.dumps(getattr(b, sys.argv[5])(tuple(json.loads(sys.argv[2])), int(sys.argv[3])) "
            "if ok else None))")
    run = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)),
                          json.dumps(list(shape)), str(repeats), str(threads), case, str(int(flush))],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[16, 16384, 128])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    print(f"torch {torch.__version__}, threads = {args.threads}, float32 tensors of shape {shape}, "
          f"median of {args.repeats}")
    (kept, _), flushed = (in_process("denormal_case", shape, args.repeats, args.threads, flush=f) for f in (0, 1))
    if flushed is None:
        print("  denormals: this CPU cannot flush them (torch.set_flush_denormal(True) returned False)")
    else:
        print(f"  denormals, one multiply-add over them: {kept:.2f} ms kept, {flushed[0]:.2f} ms flushed "
              f"({kept / flushed[0]:.1f}x; {100 * flushed[1]:.0f}% of the flushed outputs denormal)")
    off, on = (in_process("clone_ms", shape, args.repeats, args.threads, thp=s) for s in ("0", "1"))
    print(f"  clone() of a fresh tensor: {off:.2f} ms with THP_MEM_ALLOC_ENABLE=0, {on:.2f} ms with =1 "
          f"({off / on:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
