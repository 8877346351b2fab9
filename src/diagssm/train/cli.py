"""The `diagssm` command. Subcommands so far: `plot convergence`, `info`.

Training (`train`, `eval`, `generate`), `bench` and `data` come with the training tools.
"""
import argparse
import sys

LAYERS = ("S4D", "DSS", "S5", "S4")


def _plot(args):
    if args.what == "convergence":
        from diagssm.theory import plot_convergence

        errors = plot_convergence(args.out)
        print("relative L2 error of the first four basis kernels, S4D-LegS (B/2) against S4-LegS:")
        for N, err in errors.items():
            print(f"  N = {N:5d}: {err:.3g}")
        print(f"saved {args.out}")


def _info(args):
    import diagssm

    layer = getattr(diagssm, args.layer)(args.d_model, d_state=args.d_state)
    print(layer)
    for name, p in layer.named_parameters():
        print(f"  {name:<16} {str(tuple(p.shape)):<20} {p.numel():>10,}")
    print(f"  {'total':<37}{sum(p.numel() for p in layer.parameters()):>10,}")


def build_parser():
    parser = argparse.ArgumentParser(prog="diagssm", description="Diagonal state space models: tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    plot = sub.add_parser("plot", help="draw a figure", description="Draw a figure and save it.")
    plot.add_argument("what", choices=["convergence"],
                      help="convergence: basis kernels of S4-LegS against S4D-LegS as N grows (S4D paper)")
    plot.add_argument("--out", default="docs/figures/convergence.png", help="where to save the PNG")
    plot.set_defaults(run=_plot)
    info = sub.add_parser("info", help="a layer's parameters and their counts",
                          description="Build one layer and print its parameters with shapes and counts.")
    info.add_argument("layer", choices=LAYERS)
    info.add_argument("--d-model", type=int, default=64, help="H, the number of channels")
    info.add_argument("--d-state", type=int, default=64, help="N, the state size (see the README glossary)")
    info.set_defaults(run=_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
