"""Networks: building blocks, the ResNet classifier and the diffusion U-Net."""
from .attention import SelfAttention2d
from .embedding import NoiseEmbedding, timestep_embedding
from .init import init_kaiming, lsuv_init, pca_init_
from .layers import ResBlock, conv, group_norm, match_memory_format
from .resnet import ResNet, ResNetConfig
from .unet import EmbResBlock, UNet, UNetConfig, drop_labels

__all__ = ["SelfAttention2d", "NoiseEmbedding", "timestep_embedding", "init_kaiming", "lsuv_init", "pca_init_",
           "ResBlock", "conv", "group_norm", "match_memory_format", "ResNet",
           "ResNetConfig", "EmbResBlock", "UNet", "UNetConfig", "drop_labels"]
