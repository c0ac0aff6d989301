"""The nnU-Net v2 interop as a medadapt plugin (entry point ``medadapt.plugins: nnunet``, :mod:`medadapt.plugins`).

Registers, without importing nnunetv2 (each part imports it when it runs):

* the model loader ``nnunet``: nnU-Net trained model folders and their zips (:mod:`.model`);
* the case backend ``nnunet``: nnunetv2's own preprocessor and export for plans with an ``nnunet`` section
  (:mod:`.preprocessing`);
* the commands ``export-nnunet`` and ``nnunet-train`` (:mod:`.cli`);
* the speed reference ``nnunet``: ``bench-speed --against-nnunet`` (:mod:`.speed`).
"""
from __future__ import annotations


def _is_model(path) -> bool:
    from medadapt.nnunet.model import is_nnunet_model

    return is_nnunet_model(path)


def _load_model(path):
    from medadapt.nnunet.model import load_nnunet_model

    return load_nnunet_model(path)


def _preprocess_case(images, label, plan):
    from medadapt.nnunet.preprocessing import preprocess_case

    return preprocess_case(images, label, plan)


def _revert_logits(logits, properties, plan, labels):
    from medadapt.nnunet.preprocessing import revert_logits

    return revert_logits(logits, properties, plan, labels)


def _check_network(spec, folder=None):
    from medadapt.nnunet.speed import check_network

    return check_network(spec, folder)


def _run_against(*args, **kwargs):
    from medadapt.nnunet.speed import run_against_nnunet

    return run_against_nnunet(*args, **kwargs)


def register(registry) -> None:
    """Called once by :func:`medadapt.plugins.load_plugins`; imports nothing heavy (not nnunetv2, not torch)."""
    from medadapt.nnunet.cli import commands

    registry.model_loader("nnunet", _is_model, _load_model)
    registry.case_backend("nnunet", _preprocess_case, _revert_logits)
    for name, add in commands.add.items():
        registry.command(name, commands.help[name], add)
    registry.speed_reference("nnunet", _check_network, _run_against)
