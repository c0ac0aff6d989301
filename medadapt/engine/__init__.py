"""One training engine for pretraining and fine-tuning, with nnU-Net's optimisation conventions."""
from medadapt.engine import distributed
from medadapt.engine.losses import DeepSupervisedDiceCE, deep_supervision_weights
from medadapt.engine.trainer import Trainer, TrainingConfig

__all__ = ["distributed", "Trainer", "TrainingConfig", "DeepSupervisedDiceCE", "deep_supervision_weights"]
