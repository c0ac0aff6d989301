"""Networks (nnU-Net's, via dynamic-network-architectures; MONAI's SwinUNETR, medadapt.models.swin), presets, model
folders and part discovery."""
from medadapt.models.network import NetworkSpec, build_network, PRESETS, preset
from medadapt.models.parts import ModelParts, model_parts
from medadapt.models.model_folder import ModelFolder, save_model_folder, load_model_folder

__all__ = [
    "NetworkSpec", "build_network", "PRESETS", "preset",
    "ModelParts", "model_parts",
    "ModelFolder", "save_model_folder", "load_model_folder",
]
