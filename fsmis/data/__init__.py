"Data: NIfTI I/O, the dataset registry, folds, preprocessing, phantoms, supervoxels, augmentation and episodes."
from . import phantom as _phantom  # noqa: F401 (registers the built-in dataset 'phantom')
