"""Where the time of a recurrent step goes, on the CPU, float32, under no_grad (issue #7's
inference throughput): microseconds per call, median of --repeats batches of --calls calls after
a warm-up, for
  - `ops.diagonal_step` (S4D's and DSS's step, one native call) and `diagonal_step_ref` (the same
    step as PyTorch ops), at B = 16, H = 128, 32 complex modes; S5's `s5_native.s5_step` and
    `s5_step_ref` (P = 32 modes shared by the channels); S4's `ops.step.dplr_step` and
    `dplr_step_ref` (32 modes per channel, rank 1);
  - one layer's `step` (its checks, the cached system, the step) for S4D, DSS, S5 and S4;
  - one block's `step` (norm, layer, GELU and output linear, residual) and a 4-layer model's `step`,
    as `diagssm bench` builds it (d_model 128, d_state 64, embedding encoder, per-step head).
and the minor page faults per call (getrusage): a step that gets its new states from fresh pages
runs up to twice as slow. The process is set up as the layer benchmark's cases (`setup_process`: --threads, flushed
denormals; THP is the caller's, and these tensors are too small for it to matter). It prints a
markdown table.

    python benchmarks/bench_step.py
    python benchmarks/bench_step.py --layers s4d --repeats 3
"""
import argparse
import resource
import statistics
import sys
import time

from diagssm.bench import B, H, N, cpu_model, process_settings, setup_process  # shared

import torch

from diagssm.cpu import keep_freed_memory
from diagssm.layers import DSS, S4, S4D, S5
from diagssm.models import SequenceModel
from diagssm.ops import diagonal_step, diagonal_step_ref, s5_native
from diagssm.ops.step import dplr_step, dplr_step_ref

LAYERS = {"s4d": S4D, "dss": DSS, "s5": S5, "s4": S4}


def us_per_call(fn, calls, repeats):
    """Median over `repeats` batches of `calls` calls (after one warm-up batch), in microseconds, and
    the minor page faults per call over those batches (fresh memory from the system)."""
    times, faults = [], 0
    for k in range(repeats + 1):
        if k == 1:  # after the warm-up
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append(1e6 * (time.perf_counter() - t0) / calls)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (calls * repeats)
    return statistics.median(times[1:]), faults


def cases(names):
    """(what, fn) pairs, each fn one call."""
    g = torch.Generator().manual_seed(0)
    u_t = torch.randn(B, H, generator=g)
    out = []
    s4d = S4D(H, d_state=N, check_finite=False)
    state = torch.randn(B, H, N // 2, dtype=torch.complex64, generator=g)
    args = (u_t, state, *s4d.step_system(None, 1.0), s4d.D.detach(), s4d.factor)
    for fn in (diagonal_step, diagonal_step_ref):
        out.append((f"ops.{fn.__name__} (B {B}, H {H}, {N // 2} modes)", lambda fn=fn: fn(*args)))
    s5 = S5(H, d_state=N, check_finite=False)
    s5_args = (u_t, s5.default_state(B) + 0.1, *s5.step_system(1.0), s5.D.detach())
    for fn in (s5_native.s5_step, s5_native.s5_step_ref):
        out.append((f"ops.s5_native.{fn.__name__} (B {B}, H {H}, {s5.n_modes} modes)", lambda fn=fn: fn(*s5_args)))
    s4 = S4(H, d_state=N, check_finite=False)
    s4_args = (u_t, s4.default_state(B) + 0.1, *s4.step_system(1.0), s4.D.detach())
    for fn in (dplr_step, dplr_step_ref):
        what = f"ops.{fn.__name__} (B {B}, H {H}, {s4.n_modes} modes, rank {s4.rank})"
        out.append((what, lambda fn=fn: fn(*s4_args)))
    for name in names:
        layer = LAYERS[name](H, d_state=N, check_finite=False)
        s = layer.default_state(B) + 0.1
        out.append((f"{name}: layer.step", lambda layer=layer, s=s: layer.step(u_t, s)))
        model = SequenceModel(256, 256, d_model=H, n_layers=4, layer=name,
                              layer_kwargs=dict(d_state=N, check_finite=False), encoder="embedding",
                              pooling="none", head="per_step").eval()
        states = model.default_state(B)
        block = model.blocks[0]
        out.append((f"{name}: block.step", lambda block=block, s=states[0]: block.step(u_t, s)))
        x_t = torch.randint(0, 256, (B,), generator=g)
        out.append((f"{name}: model.step (4 blocks)", lambda model=model, states=states: model.step(x_t, states)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="diagssm.cpu.keep_freed_memory() first, as the diagssm commands do")
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    settings = setup_process(args.threads)
    print(f"# recurrent steps (CPU, float32, no_grad)\n\ntorch {torch.__version__}, threads = {settings['threads']}, "
          f"CPU: {cpu_model()}. {process_settings([settings])} Median of {args.repeats} batches of "
          f"{args.calls} calls.\n")
    print("| what | us per call | page faults per call |\n|---|---|---|")
    with torch.no_grad():
        for what, fn in cases(args.layers):
            us, faults = us_per_call(fn, args.calls, args.repeats)
            print(f"| {what} | {us:.1f} | {faults:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
