"""The `diagssm` command: train, eval, generate, bench, plot, info, data, study.

Exit codes: 0 success; 1 training diverged (NaN/inf loss or gradient); 2 a usage or config
error (the message names the argument), a file that cannot be read or written (a read-only or
full disk: the operating system's error), or torch.compile failing with run.compile=true;
130 / 143 training stopped by SIGINT / SIGTERM after writing a checkpoint (128 + the signal
number), and 130 for Ctrl-C in any other command. Under torchrun every process returns the same
code (torchrun's own is 1 after a signal).
"""
import argparse
import sys

LAYERS = ("S4D", "DSS", "S5", "S4")


def _info(args):
    import diagssm

    layer = getattr(diagssm, args.layer)(args.d_model, d_state=args.d_state)
    print(layer)
    for name, p in layer.named_parameters():
        print(f"  {name:<16} {str(tuple(p.shape)):<20} {p.numel():>10,}")
    print(f"  {'total':<37}{sum(p.numel() for p in layer.parameters()):>10,}")
    return 0


def _train(args):
    from diagssm.train.commands import cmd_train

    return cmd_train(args)


def _eval(args):
    from diagssm.train.commands import cmd_eval

    return cmd_eval(args)


def _generate(args):
    from diagssm.train.generate import cmd_generate

    return cmd_generate(args)


def add_train(sub):
    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a model. The run folder gets config.yaml (resolved), metrics.csv, "
                                   "checkpoints/ and curves.png. SIGINT/SIGTERM save a checkpoint and exit "
                                   "with 130/143; --resume continues from the newest valid checkpoint. "
                                   "Data-parallel: torchrun --nproc_per_node=N -m diagssm train ... "
                                   "(optim.batch_size is then the global batch; gloo on CPU, nccl on CUDA).")
    p.add_argument("--config", help="YAML config (sections model, task, optim, run); with --resume, "
                                    "default: the run folder's config.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting by dotted key, e.g. --set optim.lr=1e-3 (repeatable; "
                        "VALUE is read as YAML)")
    p.add_argument("--run-dir", help="run folder (default: runs/<config name>-<date>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its newest valid checkpoint")
    p.set_defaults(run=_train)


def add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a run's checkpoint on a split",
                       description="Load a run's config and checkpoint and print loss and metric on a split, "
                                   "at the run's run.precision (as it validated).")
    p.add_argument("--run-dir", required=True, help="the run folder (from diagssm train)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split (default test)")
    p.add_argument("--checkpoint", default="latest",
                   help="'latest' (the default: newest valid step checkpoint), 'best' (best val metric), a "
                        "path, or a file name in the run's checkpoints/ (step_00000080.pt)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the run's optim.batch_size)")
    p.add_argument("--device", help="device (default: the run's run.device)")
    p.add_argument("--rate", type=float, default=1.0,
                   help="scale every SSM step size by this factor: 2 evaluates a model trained at 16 kHz on "
                        "8 kHz data (the zero-shot sampling-rate test; default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change the run's config for this evaluation, e.g. --set task.params.test_rate=8000 "
                        "(repeatable; the model must still fit the checkpoint)")
    p.set_defaults(run=_eval)


def add_generate(sub):
    from diagssm.train.generate import CONTINUATIONS

    p = sub.add_parser("generate", help="step a per-step model through a prompt and beyond",
                       description="Recurrent inference: feed a prompt through model.step, continue for "
                                   "--steps steps, print the outputs and check them against model(x).")
    p.add_argument("--run-dir", required=True, help="the run folder of a per-step model (pooling 'none')")
    p.add_argument("--checkpoint", default="latest",
                   help="'latest' (the default), 'best', a path or a file name in the run's checkpoints/")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="where the prompt comes from")
    p.add_argument("--index", type=int, default=0, help="which sequence of the split (default 0)")
    p.add_argument("--prompt-len", type=int, default=100, help="prompt length in steps (default 100)")
    p.add_argument("--steps", type=int, default=100, help="steps to run after the prompt (default 100)")
    p.add_argument("--then", default="zeros", choices=CONTINUATIONS,
                   help="input after the prompt: zeros, the rest of the sequence (data), or the model's "
                        "own output (feedback)")
    p.add_argument("--every", type=int, default=10, help="print every N-th step (default 10)")
    p.add_argument("--out", help="also write every step's inputs and outputs to this CSV file")
    p.set_defaults(run=_generate)


def add_info(sub):
    info = sub.add_parser("info", help="a layer's parameters and their counts",
                          description="Build one layer and print its parameters with shapes and counts.")
    info.add_argument("layer", choices=LAYERS, type=lambda name: {n.lower(): n for n in LAYERS}.get(name.lower(), name),
                      help="the layer class (any case: s4d as in configs and bench, or S4D)")
    info.add_argument("--d-model", type=int, default=64, help="H, the number of channels")
    info.add_argument("--d-state", type=int, default=64, help="N, the state size (see the README glossary)")
    info.set_defaults(run=_info)


def _bench(args):
    from diagssm.bench import main as bench_main

    return bench_main(args.bench_args)


def add_bench(sub):
    p = sub.add_parser("bench", help="time the layers against the naive formulations (diagssm bench --help)",
                       description="Forward, forward+backward and peak memory of S4D, DSS, S5 and S4 against "
                                   "the naive formulations; all arguments go to diagssm.bench (see --help there).",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of diagssm.bench, e.g. --quick")
    p.set_defaults(run=_bench)


def build_parser():
    import torch

    from diagssm import __version__

    parser = argparse.ArgumentParser(prog="diagssm", description="Diagonal state space models: tools.")
    parser.add_argument("--version", action="version", version=f"diagssm {__version__} (torch {torch.__version__})",
                        help="print diagssm's and torch's versions and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    from diagssm.train.data_commands import add_data
    from diagssm.train.plot_commands import add_plot
    from diagssm.train.study import add_study

    for add in (add_train, add_eval, add_generate, add_bench, add_plot, add_info, add_data, add_study):
        add(sub)
    return parser


def main(argv=None):
    """Run the command; return its exit code (module docstring). Errors print one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except ModuleNotFoundError as e:  # the console script is installed without the [train] extra too
        if e.name not in EXTRAS:
            raise
        print(f"diagssm: error: this command needs {EXTRAS[e.name]} (pip install 'diagssm[train]')",
              file=sys.stderr)
        return 2


# the [train] extra (pyproject.toml): module -> package
EXTRAS = {"yaml": "PyYAML", "tqdm": "tqdm", "matplotlib": "matplotlib", "PIL": "Pillow"}


def _main(argv):
    from diagssm.cpu import fast_cpu_settings

    fast_cpu_settings()  # speed only: denormals flushed, huge pages for large tensors
    if argv[:1] == ["bench"]:  # every option, --help included, belongs to diagssm.bench
        from diagssm.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    from diagssm.train.checkpoint import CheckpointError
    from diagssm.train.loop import TrainingDiverged
    from diagssm.train.world import CompileError

    try:
        return args.run(args)
    except TrainingDiverged as e:
        print(f"diagssm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, CheckpointError, CompileError) as e:  # OSError: a read-only or full disk, ...
        print(f"diagssm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves and returns 130 itself): no traceback
        print(f"diagssm {args.command}: interrupted", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
