"""Flax NNX teachers and students: MLPs, a small CNN, CIFAR ResNets, WRNs, MobileNetV2, and
Llama / Qwen2 / Qwen3 decoders with Hugging Face checkpoints in and out."""

from jkd.models.batchnorm import BatchNorm
from jkd.models.cnn import SmallCNN
from jkd.models.decoder import Decoder
from jkd.models.decoder_config import DecoderConfig
from jkd.models.hf import load_hf
from jkd.models.hf import save_hf
from jkd.models.mlp import MLP
from jkd.models.mobilenet import MobileNetV2
from jkd.models.resnet import CifarResNet
from jkd.models.resnet import WideResNet
from jkd.models._layers import expose
from jkd.models.zoo import MODELS
from jkd.models.zoo import ModelStats
from jkd.models.zoo import create_model
from jkd.models.zoo import model_stats
from jkd.models.zoo import call_with_features

__all__ = [
    "BatchNorm", "Decoder", "DecoderConfig", "MLP", "MODELS", "CifarResNet", "MobileNetV2", "ModelStats", "SmallCNN", "WideResNet",
    "call_with_features", "create_model", "expose", "load_hf", "model_stats", "save_hf",
]
