"""Export of a student: StableHLO reloaded in a fresh process, ONNX in onnxruntime, and only
inference inside (no dropout, no randomness, normalisation included)."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from jkd import export as E
from jkd.compress import quantization as Q
from jkd.data.embedded import load_mnist_sample
from jkd.models import create_model
from jkd.train import apply_model, freeze_model

MEAN, STD = (0.1307,), (0.3081,)


def _meta(name, **extra):
    return {
        "model": name,
        "options": [],
        "role": "distilled",
        "dataset": "jkd_mnist_sample",
        "num_classes": 10,
        "image_shape": [28, 28, 1],
        "mean": list(MEAN),
        "std": list(STD),
        **extra,
    }


def _model(name, **options):
    return freeze_model(create_model(name, num_classes=10, input_shape=(28, 28, 1), seed=0, **options))


def _reference(graphdef, variables, images):
    """The model in eval mode on images normalised by hand (float64 normalisation)."""
    x = ((images.astype(np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)).astype(np.float32)
    return np.asarray(
        apply_model(graphdef, variables.params, variables.batch_stats, variables.rest, jnp.asarray(x), train=False)[0]
    )


@pytest.fixture(scope="module")
def test_images():
    images, _ = load_mnist_sample("test")
    return images


def test_stablehlo_reloads_in_a_fresh_process_with_identical_outputs(tmp_path, test_images):
    graphdef, variables = _model("cnn", width=8)
    paths = E.export_model(graphdef, variables, _meta("cnn"), tmp_path, ("stablehlo",))
    batches = {n: test_images[:n] for n in (1, 7, 64)}  # one artifact, any batch size
    np.savez(tmp_path / "in.npz", **{str(n): b for n, b in batches.items()})
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from jax import export
        fn = export.deserialize(bytearray(open({str(paths["stablehlo"])!r}, 'rb').read()))
        data = np.load({str(tmp_path / "in.npz")!r})
        np.savez({str(tmp_path / "out.npz")!r}, **{{k: np.asarray(fn.call(data[k])) for k in data.files}})
    """)  # only jax is imported there: no jkd, no flax model code
    # Same XLA settings as here (jkd adds one CPU flag at import): bitwise identical outputs.
    import os

    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    out = dict(np.load(tmp_path / "out.npz"))
    # JAX's default settings: other CPU kernels may round differently, by an ulp or so.
    subprocess.run([sys.executable, "-c", script], check=True, env={**env, "XLA_FLAGS": ""})
    default = np.load(tmp_path / "out.npz")
    here = E.load_stablehlo(paths["stablehlo"])
    for n, images in batches.items():
        np.testing.assert_array_equal(out[str(n)], np.asarray(here(images)))
        np.testing.assert_allclose(default[str(n)], out[str(n)], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[str(n)], _reference(graphdef, variables, images), rtol=1e-5, atol=1e-5)
        assert out[str(n)].shape == (n, 10)


@pytest.mark.parametrize("name, options", [("cnn", {"width": 8}), ("mlp", {"hidden": (64,), "dropout": 0.5})])
def test_onnx_matches_jax_on_the_test_split(tmp_path, test_images, name, options):
    graphdef, variables = _model(name, **options)
    paths = E.export_model(graphdef, variables, _meta(name), tmp_path, ("onnx",))
    session = E.onnx_session(paths["onnx"])
    got = np.concatenate(
        [session.run(None, {"images": test_images[i : i + 250]})[0] for i in range(0, len(test_images), 250)]
    )
    want = _reference(graphdef, variables, test_images)
    assert got.shape == want.shape == (len(test_images), 10)
    assert np.max(np.abs(got - want)) < 1e-4
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) >= 0.999


def test_only_inference_goes_out(tmp_path, test_images):
    """A student with dropout and one with BatchNorm: the artifacts hold no dropout, no
    random-number ops, and give the eval-mode outputs every time."""
    forbidden_onnx = {
        "Dropout",
        "RandomUniform",
        "RandomUniformLike",
        "RandomNormal",
        "RandomNormalLike",
        "Multinomial",
    }
    for name, options in (("mlp", {"hidden": (64,), "dropout": 0.5}), ("cnn", {"width": 8})):
        graphdef, variables = _model(name, **options)
        out = tmp_path / name
        paths = E.export_model(graphdef, variables, _meta(name), out)
        nodes = onnx.load(str(paths["onnx"])).graph.node
        ops = {node.op_type for node in nodes}
        assert not ops & forbidden_onnx, ops & forbidden_onnx
        for node in nodes:  # BatchNormalization, if any, uses its running statistics
            if node.op_type == "BatchNormalization":
                assert all(a.i == 0 for a in node.attribute if a.name == "training_mode")
        text = jax.export.deserialize(bytearray(paths["stablehlo"].read_bytes())).mlir_module()
        assert "rng" not in text and "random" not in text
        fn = E.load_stablehlo(paths["stablehlo"])
        a, b = np.asarray(fn(test_images[:32])), np.asarray(fn(test_images[:32]))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, _reference(graphdef, variables, test_images[:32]), rtol=1e-5, atol=1e-5)
        assert not (out / "ckpt").exists() and sorted(p.name for p in out.iterdir()) == sorted(
            [E.ONNX_FILE, E.PREPROCESSING_FILE, E.STABLEHLO_FILE]
        )


def test_preprocessing_json_says_how_to_call_it(tmp_path):
    graphdef, variables = _model("mlp", hidden=(16,))
    E.export_model(graphdef, variables, _meta("mlp"), tmp_path, ("stablehlo",))
    pre = json.loads((tmp_path / E.PREPROCESSING_FILE).read_text())
    assert pre["input"] == {
        "name": "images",
        "dtype": "uint8",
        "layout": "NHWC",
        "shape": ["batch", 28, 28, 1],
        "range": [0, 255],
    }
    assert pre["normalization"]["inside_artifact"] is True
    assert pre["normalization"]["mean"] == list(MEAN) and pre["normalization"]["std"] == list(STD)
    assert pre["files"] == {"stablehlo": E.STABLEHLO_FILE} and pre["num_classes"] == 10


def test_an_int8_student_exports_to_stablehlo(tmp_path, test_images):
    model = create_model("mlp", num_classes=10, input_shape=(28, 28, 1), seed=0, hidden=(32,))
    with Q.qwix_promotion():
        calib = jnp.asarray((test_images[:64] / 255.0 - MEAN[0]) / STD[0], jnp.float32)
        graphdef, variables = freeze_model(Q.quantize(model, calib, Q.INT8_WEIGHTS))
        paths = E.export_model(
            graphdef, variables, _meta("mlp", quantization=Q.INT8_WEIGHTS.name), tmp_path, ("stablehlo",)
        )
        got = np.asarray(E.load_stablehlo(paths["stablehlo"])(test_images[:16]))
        want = _reference(graphdef, variables, test_images[:16])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert jax.export.deserialize(bytearray(paths["stablehlo"].read_bytes())).mlir_module().count("xi8>") > 0


def test_bad_input_is_refused(tmp_path):
    graphdef, variables = _model("mlp", hidden=(16,))
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        E.export_model(graphdef, variables, _meta("mlp"), tmp_path, ("tflite",))
    with pytest.raises(ValueError, match="ONNX export of an int8 student"):
        E.export_model(graphdef, variables, _meta("mlp", quantization=Q.INT8_WEIGHTS.name), tmp_path, ("onnx",))
    serve = E.serving_function(graphdef, variables, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="uint8"):
        serve(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(FileNotFoundError):
        E.load_stablehlo(tmp_path / "missing.stablehlo")


def test_int8_onnx_runs_integer_kernels_and_a_layer_left_in_float_is_refused(tmp_path, monkeypatch):
    g, v = _model("mlp_30")
    float_path = E.export_onnx(E.serving_function(g, v, mean=MEAN, std=STD), (28, 28, 1), tmp_path / "f.onnx")
    images = load_mnist_sample("train")[0][:64]
    with pytest.raises(ValueError, match="at least 32"):
        E.quantize_onnx_int8(float_path, images[:8], tmp_path / "few.onnx")
    q = E.quantize_onnx_int8(float_path, images, tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(q)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    test = load_mnist_sample("test")[0][:200]
    ref = E.onnx_session(float_path).run(None, {"images": test})[0]
    got = E.onnx_session(q).run(None, {"images": test})[0]
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.97  # int8 of the same function
    # A quantizer that leaves a layer float (as it would for an op it cannot run in integer form)
    # is caught, the layer named, and nothing is written.
    import shutil

    import onnxruntime.quantization as ortq

    monkeypatch.setattr(ortq, "quantize_static", lambda src, dst, *a, **k: shutil.copy(src, dst))
    with pytest.raises(ValueError, match=r"cannot run these layers .* in integer form: .*Gemm"):
        E.quantize_onnx_int8(float_path, images, tmp_path / "bad.onnx")
    assert not list(tmp_path.glob("bad.onnx*"))
