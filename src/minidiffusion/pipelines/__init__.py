"""Inference only: load saved components and turn settings into images, grids, progressions and .npz files.

Loading a pipeline imports no training code (a test checks `minidiffusion.learner` and
`minidiffusion.recipes` stay out of `sys.modules`). The command line and the web page call these.
"""
from .image import DiffusionModel, DiffusionModelConfig, check_sampling, save_model, shipped_models
from .outputs import sample_to_files, save_npz, save_samples

__all__ = ["DiffusionModel", "DiffusionModelConfig", "check_sampling", "save_model", "shipped_models",
           "sample_to_files", "save_npz", "save_samples"]
