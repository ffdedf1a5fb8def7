"""minidiffusion: from deep learning foundations to Stable Diffusion, readable, fast and tested.

Images everywhere in this package are float32 NCHW tensors in [-1, 1] (see data/images.py).
The names below are the public API; each lives in the module named in its docstring.
"""

from .classifier import (
                         ClassifierConfig,
                         build_classifier,
                         evaluate_accuracy,
                         predict_mc_dropout,
                         predict_tta,
                         train_classifier,
)
from .config import apply_overrides, from_dict, load_preset
from .data.augment import BatchAugment, random_crop, random_erase, random_flip
from .data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from .data.fashion_mnist import (
                         download_fashion_mnist,
                         fashion_mnist_loaders,
                         find_fashion_mnist,
                         load_fashion_mnist,
)
from .data.folders import image_folder_loaders, load_image_folder
from .data.images import check_range, float_to_uint8, save_grid, uint8_to_float
from .data.loaders import DataLoaders, TensorLoader
from .diffusion import (
                         OBJECTIVES,
                         SAMPLERS,
                         CosineObjective,
                         DDPMObjective,
                         EDMObjective,
                         cfg_denoiser,
                         get_sampler,
                         nfe,
                         sigmas_ddpm,
                         sigmas_karras,
)
from .diffusion.fid_callback import FIDCB
from .diffusion.pipeline import DiffusionModel
from .diffusion.training import DiffusionCB, DiffusionConfig, train_diffusion
from .errors import CheckpointError, ConfigError, DataError, MinidiffusionError, TrainingError
from .evaluate import evaluate_model, evaluate_samples
from .learner import Callback, Learner
from .metrics import fid_from_features, kid_from_features, load_feature_network
from .nn import ResNet, ResNetConfig, UNet, UNetConfig

__version__ = "0.1.0"

__all__ = [
    "ClassifierConfig", "build_classifier", "evaluate_accuracy", "predict_mc_dropout", "predict_tta",
    "train_classifier", "apply_overrides", "from_dict", "load_preset", "BatchAugment", "random_crop",
    "random_erase", "random_flip", "FASHION_MNIST_CLASSES", "download_fashion_mnist", "fashion_mnist_loaders",
    "find_fashion_mnist", "load_fashion_mnist", "image_folder_loaders", "load_image_folder", "check_range",
    "float_to_uint8", "save_grid", "uint8_to_float", "DataLoaders", "TensorLoader", "OBJECTIVES", "SAMPLERS",
    "CosineObjective", "DDPMObjective", "EDMObjective", "cfg_denoiser", "get_sampler", "nfe", "sigmas_ddpm",
    "sigmas_karras", "DiffusionModel", "DiffusionCB", "FIDCB", "DiffusionConfig", "train_diffusion", "CheckpointError",
    "ConfigError", "DataError", "MinidiffusionError", "TrainingError", "evaluate_model", "evaluate_samples",
    "Callback", "Learner", "fid_from_features", "kid_from_features", "load_feature_network", "ResNet",
    "ResNetConfig", "UNet", "UNetConfig", "__version__",
]
