"""Flax NNX teachers and students: MLPs, a small CNN, CIFAR ResNets, WRNs, MobileNetV2, and
Llama / Qwen2 / Qwen3 decoders with Hugging Face checkpoints in and out.

The names below are loaded when first used, so that importing one module of the package (the
decoder, the sampler, feature capture) does not load every model family and the Hugging Face I/O.
"""

import importlib

_EXPORTS = {
    "BatchNorm": "jkd.models.batchnorm",
    "SmallCNN": "jkd.models.cnn",
    "Decoder": "jkd.models.decoder",
    "DecoderConfig": "jkd.models.decoder_config",
    "load_hf": "jkd.models.hf",
    "save_hf": "jkd.models.hf",
    "MLP": "jkd.models.mlp",
    "MobileNetV2": "jkd.models.mobilenet",
    "CifarResNet": "jkd.models.resnet",
    "WideResNet": "jkd.models.resnet",
    "expose": "jkd.models._layers",
    "call_with_features": "jkd.models._layers",
    "MODELS": "jkd.models.zoo",
    "ModelStats": "jkd.models.zoo",
    "create_model": "jkd.models.zoo",
    "model_stats": "jkd.models.zoo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jkd.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
