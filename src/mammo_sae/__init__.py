"""mammo-sae: sparse autoencoders for mammography foundation models.

Public API (imported lazily so `import mammo_sae` stays fast):

    load_image_encoder(path)   Mammo-CLIP .tar / classifier .pth / own format -> EfficientNet
    load_classifier(path)      Mammo-CLIP downstream .pth / own format -> ConceptClassifier
    load_sae(path)             native SAE dir / released MammoSAE .pt -> SparseAutoencoder
    load_records(source)       VinDr folds CSV, official CSVs or a phantom dir -> [ImageRecord]
    ActivationStore(path)      an extracted activation store
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_image_encoder": "mammo_sae.models.checkpoints",
    "load_classifier": "mammo_sae.models.checkpoints",
    "create_encoder": "mammo_sae.models.registry",
    "load_sae": "mammo_sae.sae.checkpoints",
    "load_records": "mammo_sae.data.vindr",
    "ImageRecord": "mammo_sae.data.records",
    "ActivationStore": "mammo_sae.activations.store",
    "MammoSaeError": "mammo_sae.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mammo_sae' has no attribute {name!r}")
