"""`python -m roberta_ds.dist`: the launch preflight (each task prints what discovery finds).

Discovery lives in `roberta_ds.launch.dist`; this module keeps the old path that the slurm/
templates and the README run.
"""

from __future__ import annotations

import sys

from roberta_ds.launch.dist import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
