import sys

from roberta_ds.cli import main

sys.exit(main())
