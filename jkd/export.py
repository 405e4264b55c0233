"""Deployable artifacts of a trained student: StableHLO (``jax.export``) and ONNX.

An artifact is one function ``uint8 images [B, H, W, C] -> float32 logits [B, num_classes]``
with the weights inside as constants and the normalisation ``(x / 255 - mean) / std`` inside,
so it runs on raw images; ``B`` is symbolic (any batch size). It is traced in eval mode:
BatchNorm uses its running statistics, dropout is gone, and nothing of training (optimizer
state, RNG counters, the teacher) goes out. ``preprocessing.json`` beside it says what the
input and output are.

StableHLO needs only JAX to run (``load_stablehlo``); ONNX needs ``onnxruntime``, and writing
it needs ``jax2onnx`` (the ``onnx`` extra; see the README).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jkd.runtime.atomic import atomic_write

# jax2onnx 0.17.1's nnx plugins read flax's deprecated ``Variable.value``; that warning is
# jax2onnx's to fix. Only DeprecationWarnings raised from jax2onnx's own modules are hidden.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax2onnx(\.|$)")

STABLEHLO_FILE = "model.stablehlo"
ONNX_FILE = "model.onnx"
PREPROCESSING_FILE = "preprocessing.json"
FORMATS = ("stablehlo", "onnx")


def check_formats(formats) -> tuple[str, ...]:
    """The formats asked for, checked: a tuple drawn from :data:`FORMATS`."""
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(
            f"unknown export format {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"expected one or more of: {', '.join(FORMATS)}."
        )
    return formats


def serving_function(graphdef, variables, *, mean, std) -> Callable[[jax.Array], jax.Array]:
    """``uint8 [B, H, W, C] -> float32 [B, K]``: normalise, then the model in eval mode.

    ``variables`` is a :class:`jkd.train.FrozenModel` (or anything with ``params``,
    ``batch_stats`` and ``rest``); they are closed over, so they become constants.
    """
    from jkd.train.state import apply_model

    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)

    def serve(images: jax.Array) -> jax.Array:
        if images.dtype != jnp.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [B, H, W, C]; got {images.dtype} {images.shape}.")
        x = (images.astype(jnp.float32) / jnp.float32(255.0) - mean) / std
        logits, _, _, _ = apply_model(graphdef, variables.params, variables.batch_stats, variables.rest, x, train=False)
        return logits.astype(jnp.float32)

    return serve


def _input_spec(image_shape, batch) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8)


def export_stablehlo(serve: Callable, image_shape, path: str | Path) -> Path:
    """Serialize ``serve`` with a symbolic batch size to ``path`` (bytes of ``jax.export``)."""
    (batch,) = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(serve))(_input_spec(image_shape, batch))
    path = Path(path)
    atomic_write(path, bytes(exported.serialize()))
    return path


def load_stablehlo(path: str | Path) -> Callable[[np.ndarray], jax.Array]:
    """The function saved by :func:`export_stablehlo`: ``uint8 [B, H, W, C] -> logits``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no StableHLO artifact at {path}.")
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return exported.call


class _QuietPlugins:
    """jax2onnx logs a traceback for each of its example plugins whose optional package
    (dm_pix, equinox, ...) is absent, at import and at the first conversion; those examples
    are not used here."""

    def __enter__(self):
        self.log = logging.getLogger("jax2onnx.plugins.plugin_system")
        self.level = self.log.level
        self.log.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.log.setLevel(self.level)


def _import_jax2onnx():
    try:
        with _QuietPlugins():
            from jax2onnx import to_onnx
    except ImportError as e:
        raise ImportError(
            "ONNX export needs jax2onnx and onnx: `pip install 'jkd[onnx]'` and then "
            "`pip install --no-deps jax2onnx==0.17.1` (its own pins clash with jkd's orbax); "
            "`make test` and `make demo` install both."
        ) from e
    return to_onnx


def export_onnx(serve: Callable, image_shape, path: str | Path, *, name: str = "jkd_student") -> Path:
    """Convert ``serve`` to ONNX (opset 23) with a symbolic batch dimension ``batch``."""
    to_onnx = _import_jax2onnx()
    with _QuietPlugins():
        proto = to_onnx(
            serve,
            inputs=[_input_spec(image_shape, "batch")],
            model_name=name,
            input_names=["images"],
            output_names=["logits"],
        )
    _strip_inference_dropout(proto)
    path = Path(path)
    atomic_write(path, proto.SerializeToString())
    return path


def _strip_inference_dropout(proto) -> None:
    """jax2onnx writes an ONNX ``Dropout`` for each ``nnx.Dropout`` even in eval mode (with
    ``training_mode`` a constant False, so it passes its input through). Such nodes become
    ``Identity``: no training-only op goes out. A Dropout that could train is refused."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "Dropout":
            continue
        training = node.input[2] if len(node.input) > 2 else ""
        if (training and (training not in constants or bool(constants[training]))) or (
            len(node.output) > 1 and node.output[1] in used
        ):
            raise ValueError(
                f"the exported graph has a Dropout ({node.name}) that may be active; export the model in eval mode."
            )
        graph.node.remove(node)
        graph.node.insert(index, helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
    still_used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in still_used]:
        graph.initializer.remove(init)


def onnx_session(path: str | Path):
    """An onnxruntime CPU session for an exported model (warnings about jax2onnx's
    intermediate shape annotations are silenced: they do not change the outputs)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("running ONNX needs onnxruntime: pip install 'jkd[onnx]'.") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


# The ONNX ops that carry a layer's arithmetic: each must read int8 weights and uint8 activations
# (through DequantizeLinear) for onnxruntime to run it with its integer kernels.
_INT8_OPS = ("MatMul", "Gemm", "Conv")


def quantize_onnx_int8(
    float_path: str | Path, calibration_images: np.ndarray, path: str | Path, *, min_images: int = 32
) -> Path:
    """An int8 copy of an exported float ONNX model, in the QDQ form onnxruntime runs with its
    integer kernels: weights int8 per output channel (symmetric), activations uint8 with static
    scales from ``calibration_images`` (raw ``uint8 [N, H, W, C]``, the artifact's own input;
    onnxruntime's MinMax calibration over them). Every MatMul / Gemm / Conv must come out reading
    quantized inputs, else the export is refused naming the layer; the file is written whole or
    not at all."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise ImportError("int8 ONNX export needs onnxruntime: pip install 'jkd[onnx]'.") from e
    import onnx

    images = np.asarray(calibration_images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"calibration images must be raw uint8 [N, H, W, C]; got {images.dtype} {images.shape}.")
    if len(images) < min_images:
        raise ValueError(
            f"{len(images)} calibration images are too few for static int8 scales; give at least "
            f"{min_images} (--calibration-images)."
        )

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"images": images[i : i + 128]} for i in range(0, len(images), 128)])

        def get_next(self):
            return next(self._it, None)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, pre = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".pre.tmp")
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)  # its advice to pre-process is logged on the root logger at every call
        try:
            # onnxruntime's own pre-processing first: BatchNormalization folded into the convolution
            # before it, so that the quantized Conv runs as QLinearConv (without it, measured 0.27x
            # the float model's speed for the cnn: every Conv ran in float between DequantizeLinear).
            quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(tmp),
                _Batches(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
        finally:
            root.setLevel(level)
        graph = onnx.load(str(tmp)).graph
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        float_layers = [
            n.name or n.op_type
            for n in graph.node
            if n.op_type in _INT8_OPS and not all(i in dequantized for i in n.input[:2])
        ]
        if float_layers:
            raise ValueError(
                f"onnxruntime cannot run these layers of {float_path} in integer form: "
                f"{', '.join(float_layers)} (their inputs stay float after quantization); "
                "export this model as float ONNX or int8 StableHLO instead."
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        pre.unlink(missing_ok=True)
    return path


def cpu_integer_instructions() -> list[str]:
    """The CPU's integer dot-product instructions that onnxruntime's int8 kernels use, as Linux
    reports them (``/proc/cpuinfo``): AVX2, AVX-VNNI, AVX512-VNNI, AMX-INT8 (empty elsewhere)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    names = {
        "avx2": "AVX2",
        "avx_vnni": "AVX-VNNI",
        "avx512_vnni": "AVX512-VNNI",
        "avx512_bw": "AVX512-BW",
        "avx512bw": "AVX512-BW",
        "amx_int8": "AMX-INT8",
        "asimddp": "ARM dot product (SDOT)",
    }
    return sorted({v for k, v in names.items() if k in flags})


def preprocessing(meta: dict, formats) -> dict:
    """What a user needs to call the artifact on raw images (written as ``preprocessing.json``)."""
    h, w, c = meta["image_shape"]
    return {
        "model": meta["model"],
        "dataset": meta["dataset"],
        "num_classes": meta["num_classes"],
        "files": {f: {"stablehlo": STABLEHLO_FILE, "onnx": ONNX_FILE}[f] for f in formats},
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "shape": ["batch", h, w, c], "range": [0, 255]},
        "normalization": {
            "inside_artifact": True,
            "formula": "(images / 255 - mean) / std",
            "mean": list(meta["mean"]),
            "std": list(meta["std"]),
        },
        "output": {
            "name": "logits",
            "dtype": "float32",
            "shape": ["batch", meta["num_classes"]],
            "note": "unnormalised scores; softmax gives class probabilities",
        },
        **({"quantization": meta["quantization"]} if meta.get("quantization") else {}),
        **({"sparsity": meta["sparsity"]} if meta.get("sparsity") is not None else {}),
    }


def check_artifacts(
    paths: dict[str, Path], graphdef, variables, meta: dict, *, images: int = 8, seed: int = 0
) -> dict[str, float]:
    """The largest absolute logit difference between each exported artifact (``paths`` from
    :func:`export_model`) and the model in JAX, on ``images`` random raw uint8 images."""
    x = np.random.default_rng(seed).integers(0, 256, (images, *meta["image_shape"]), dtype=np.uint8)
    reference = np.asarray(serving_function(graphdef, variables, mean=meta["mean"], std=meta["std"])(x))
    runs = {
        "stablehlo": lambda p: np.asarray(load_stablehlo(p)(x)),
        "onnx": lambda p: onnx_session(p).run(None, {"images": x})[0],
    }
    return {fmt: float(np.max(np.abs(runs[fmt](p) - reference))) for fmt, p in paths.items()}


def export_model(graphdef, variables, meta: dict, out_dir: str | Path, formats=FORMATS) -> dict[str, Path]:
    """Write the artifacts in ``formats`` and ``preprocessing.json`` to ``out_dir``; returns
    ``{format: path}``. ``meta`` is a saved model's meta (image shape, mean, std, classes)."""
    formats = check_formats(formats)
    if "onnx" in formats and meta.get("quantization"):
        raise ValueError(
            f"ONNX export of an int8 student ({meta['quantization']}) is not supported: jax2onnx "
            "0.17.1 converts nnx.Linear/Conv by their float definition and so drops qwix's int8 "
            "arithmetic. Export it with --format stablehlo (int8 weights inside), or export the "
            "float student with --int8: int8 ONNX (QDQ) that onnxruntime runs with integer kernels."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    serve = serving_function(graphdef, variables, mean=meta["mean"], std=meta["std"])
    shape = tuple(meta["image_shape"])
    writers = {
        "stablehlo": lambda: export_stablehlo(serve, shape, out / STABLEHLO_FILE),
        "onnx": lambda: export_onnx(serve, shape, out / ONNX_FILE),
    }
    paths = {f: writers[f]() for f in formats}
    atomic_write(out / PREPROCESSING_FILE, json.dumps(preprocessing(meta, formats), indent=2).encode())
    return paths


# ---- language models ------------------------------------------------------------------------------

LM_SERVING_FILE = "serving.json"


def export_lm_stablehlo(model, folder: str | Path) -> Path:
    """A decoder's forward pass as StableHLO: ``tokens int32 [B, T], attention_mask bool [B, T] ->
    logits float32 [B, T, V]`` with ``B`` and ``T`` symbolic and the weights inside as constants;
    ``serving.json`` beside it says so. Returns the folder."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    def forward(tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(tokens, attention_mask=attention_mask)

    batch, length = jax.export.symbolic_shape("batch, length")
    exported = jax.export.export(jax.jit(forward))(
        jax.ShapeDtypeStruct((batch, length), jnp.int32), jax.ShapeDtypeStruct((batch, length), jnp.bool_)
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / STABLEHLO_FILE, bytes(exported.serialize()))
    cfg = model.config
    atomic_write(
        folder / LM_SERVING_FILE,
        json.dumps(
            {
                "inputs": {
                    "tokens": "int32 [batch, length]",
                    "attention_mask": "bool [batch, length] (True: a real token)",
                },
                "output": f"float32 logits [batch, length, {cfg.vocab_size}]",
                "positions": "counted over the real tokens of each row (right or left padding both work)",
                "max_position_embeddings": cfg.max_position_embeddings,
                "load": "jax.export.deserialize(open('model.stablehlo', 'rb').read()).call(tokens, attention_mask)",
            },
            indent=2,
        ).encode(),
    )
    return folder
