"""esmloc: protein subcellular localisation data (ACC, Sequence, label), validated and split without sequence leaks.

The loading script for datasets 3.x (configs `mitochondrion`, the default, and `deeploc`):

    datasets.load_dataset("dataset_script/esmloc.py", data_files="proteins.csv", trust_remote_code=True)

The builder itself, `EsmLocDataset`, lives in the installed library (`esmloc/data.py`), so that
`esmloc.data.load_dataset(data_files=...)` builds the same dataset on datasets >= 4, which no longer runs loading
scripts, and from a pip install that has no copy of this folder. README.md beside this file is the dataset card.
"""

from esmloc.data import EsmLocDataset, EsmLocDatasetConfig  # noqa: F401  (datasets picks the builder from here)
