"""minidiffusion: from deep learning foundations to Stable Diffusion, readable, fast and tested.

Images everywhere in this package are float32 NCHW tensors in [-1, 1] (see data/images.py).
"""

__version__ = "0.1.0"
