"""`python -m roberta_ds.train`: the trainer entry point that launchers, sbatch templates and the
README run. Setup lives in `roberta_ds.engine.setup`; this module keeps the old path working."""

from __future__ import annotations

import sys

from roberta_ds.engine.setup import main  # noqa: F401 - `roberta-ds train` and older imports use it

if __name__ == "__main__":
    from roberta_ds.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
