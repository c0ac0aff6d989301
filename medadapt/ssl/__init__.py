"""Self-supervised pretext tasks of foundation models: masked-volume reconstruction (:mod:`medadapt.ssl.mae`,
nnssl's CNN masked autoencoder) and a model folder's pretext network (:mod:`medadapt.ssl.pretext`), which scores
cases by the foundation's own self-supervised loss."""
from medadapt.ssl.mae import (MaskConfig, MaskedReconstructionLoss, MaskedSampler, apply_mask, mae_loss,
                              random_block_mask)
from medadapt.ssl.pretext import PretextModel, PretextRecord, load_pretext

__all__ = ["MaskConfig", "MaskedReconstructionLoss", "MaskedSampler", "apply_mask", "mae_loss", "random_block_mask",
           "PretextModel", "PretextRecord", "load_pretext"]
