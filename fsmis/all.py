"""`from fsmis.all import *`: the public names of every module, from the bottom of the package to the top (as fastai's
`fastai.vision.all`). Written by hand, not exported from a notebook."""
from .core import *
from .data.io import *
from .data.datasets import *
from .data.folds import *
from .data.phantom import *
from .data.preprocess import *
from .data.supervoxels import *
from .data.augment import *
from .data.episodes import *
from .models.encoders import *
from .models.adnet import *
from .models.alpnet import *
from .models.ppnet import *
from .models.canet import *
from .models.intensity import *
from .losses import *
from .learner import *
from .eval.metrics import *
from .eval.inference import *
from .eval.protocols import *
from .pretrain.densecl import *
from .config import *
from .train import *
from .experiments import *
from .ablate import *
from .viz import *
