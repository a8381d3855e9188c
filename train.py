"""Fine-tune ESM-2 for subcellular localisation: `python train.py --help` (see esmloc/commands/train.py)."""

import sys

from esmloc.commands.train import main


if __name__ == "__main__":
    sys.exit(main())
