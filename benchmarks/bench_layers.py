"""Speed and memory of the S4D, DSS, S5 and S4 layers against naive formulations, and step-by-step
inference throughput: a thin wrapper of `diagssm.bench` (the same as `diagssm bench`; its module
docstring describes every measurement and estimate).

    python benchmarks/bench_layers.py                    # the full sweep, L = 1024 .. 65536
    python benchmarks/bench_layers.py --quick            # L = 1024, 1 repeat: a smoke test
    python benchmarks/bench_layers.py --layers s4d --lengths 4096 --json out.json --plot out.png
"""
import sys

from diagssm.bench import main

if __name__ == "__main__":
    sys.exit(main())
