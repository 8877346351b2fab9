"""`python -m diagssm ...` (and `torchrun -m diagssm ...`) run the `diagssm` command."""
import sys

from diagssm.train.cli import main

sys.exit(main())
