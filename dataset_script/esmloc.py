"""esmloc: protein subcellular localisation data (ACC, Sequence, label), validated and split without sequence leaks.

The loading script (configs `mitochondrion`, the default, and `deeploc`) needs esmloc installed and datasets 3.x:

    datasets.load_dataset("dataset_script/esmloc.py", data_files="proteins.csv", trust_remote_code=True)

It is not self-contained: the builder, `EsmLocDataset`, lives in the installed library (`esmloc/data.py`), so that
`esmloc.data.load_dataset(data_files=...)` builds the same dataset on datasets >= 4 (which runs no loading scripts)
and from a pip install with no copy of this folder. Without esmloc, datasets 3.x stops with "you need to install the
following dependency: esmloc"; datasets >= 4 refuses the script. To share the dataset with people who have neither,
export it as Parquet with a dataset card (`esmloc-dataset export DATA_FILES --output_dir DIR`, then
`esmloc-dataset push DIR --hub_dataset_id user/name`): `load_dataset(DIR or "user/name")` then works on every
datasets version, with no esmloc and no remote code. README.md beside this file is the dataset card of the script.
"""

from esmloc.data import EsmLocDataset, EsmLocDatasetConfig


# datasets picks the builder from this module's namespace.
__all__ = ["EsmLocDataset", "EsmLocDatasetConfig"]
