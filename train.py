"""Fine-tune ESM-2 for subcellular localisation: `python train.py --help` (see esmloc/train.py)."""

import sys

from esmloc.train import main


if __name__ == "__main__":
    sys.exit(main())
