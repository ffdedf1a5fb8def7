"""Evaluation metrics: FID/KID maths (fid.py), the guarded feature network (features.py), scoring (evaluate.py)."""

from .features import (
    ClassifierFeatures,
    FeatureExtractor,
    default_stats_dir,
    extract_features,
    load_feature_network,
    reference_stats,
)
from .fid import FeatureStats, fid_from_features, frechet_distance, gaussian_stats, kid_from_features

__all__ = ["gaussian_stats", "frechet_distance", "fid_from_features", "kid_from_features", "FeatureStats",
           "FeatureExtractor", "ClassifierFeatures", "extract_features", "reference_stats",
           "load_feature_network", "default_stats_dir"]
