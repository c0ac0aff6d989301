"""One training engine for pretraining and fine-tuning, with nnU-Net's optimisation conventions."""
from medadapt.engine import distributed
from medadapt.engine.losses import DeepSupervisedDiceCE, deep_supervision_weights
from medadapt.engine.trainer import EngineOptions, Trainer, TrainingConfig

__all__ = ["distributed", "EngineOptions", "Trainer", "TrainingConfig", "DeepSupervisedDiceCE", "deep_supervision_weights"]
