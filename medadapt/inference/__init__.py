"""Inference: sliding-window prediction with Gaussian weighting, back in each input's geometry."""
from medadapt.inference.predictor import Predictor

__all__ = ["Predictor"]
