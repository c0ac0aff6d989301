"""nnU-Net v2 interoperability (optional extra ``medadapt[nnunet]``).

* :mod:`.model`: load an nnU-Net trained model folder or exported zip as a medadapt model folder;
* :mod:`.export`: write a medadapt model as an nnU-Net trained model folder (and zip) nnU-Net predicts with;
* :mod:`.trainer`: nnU-Net's own trainer with a medadapt fine-tuning strategy applied;
* :mod:`.env`: nnU-Net's path variables and a quiet, optional import.

Importing this package does not import nnunetv2; each function imports what it needs from it lazily.
"""
