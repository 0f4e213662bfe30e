"""The insightface backend's plumbing, with tiny ONNX models generated here (FAKES of a real pack).

Real packs (buffalo_l) cannot be downloaded here. These tiny random graphs have the real models' input and
output signatures, so insightface's own model-zoo router takes them as SCRFD (9 outputs: scores, boxes and
keypoints at strides 8/16/32), the 2d106det landmark model (192x192 -> 212) and ArcFace (112x112 -> 512).
The tests check shapes, fields and the recorded backend/models, not accuracy.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dynamicid.faces import INSIGHTFACE_ROOT_ENV, FaceAnalyzer

pytest.importorskip("insightface")

RNG = np.random.default_rng(0)
STRIDES = (8, 16, 32)
BRIGHT_BOX = (256, 192, 384, 320)  # x0, y0, x1, y1 of the white square the fake detector fires on
# Keypoint offsets from an anchor centre, in stride units: eyes, nose, mouth corners (a face's layout).
FAKE_KPS = np.array([[-0.4, -0.3], [0.4, -0.3], [0.0, 0.05], [-0.3, 0.45], [0.3, 0.45]], dtype=np.float32)


def _save(nodes, inputs, outputs, initializers, path: Path) -> None:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def make_fake_scrfd(path: Path) -> None:
    """SCRFD-shaped detector: fires (stride 32 only) where the image is bright; fixed box and keypoint offsets."""
    nodes, initializers, scores, boxes, keypoints = [], [], [], [], []
    shape_1 = numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape_1")
    shape_4 = numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "shape_4")
    shape_10 = numpy_helper.from_array(np.array([-1, 10], dtype=np.int64), "shape_10")
    initializers += [shape_1, shape_4, shape_10]
    for stride in STRIDES:
        pooled = f"pool{stride}"
        nodes.append(
            helper.make_node(
                "AveragePool", ["input.1"], [pooled], kernel_shape=[stride, stride], strides=[stride, stride]
            )
        )
        heads = {
            "score": (2, np.full((2, 3, 1, 1), 10.0), np.full(2, -20.0 if stride == 32 else -100.0), "shape_1"),
            "bbox": (8, np.zeros((8, 3, 1, 1)), np.full(8, 1.5), "shape_4"),
            "kps": (20, np.zeros((20, 3, 1, 1)), np.tile(FAKE_KPS.ravel(), 2), "shape_10"),
        }
        for head, (_, weight, bias, shape) in heads.items():
            initializers += [_const(f"{head}{stride}_w", weight), _const(f"{head}{stride}_b", bias)]
            conv = f"{head}{stride}_conv"
            nodes.append(helper.make_node("Conv", [pooled, f"{head}{stride}_w", f"{head}{stride}_b"], [conv]))
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [conv], [f"{conv}_act"]))
                conv = f"{conv}_act"
            nodes.append(helper.make_node("Transpose", [conv], [f"{head}{stride}_nhwc"], perm=[0, 2, 3, 1]))
            nodes.append(helper.make_node("Reshape", [f"{head}{stride}_nhwc", shape], [f"{head}_{stride}"]))
        anchors = f"anchors_{stride}"
        scores.append(helper.make_tensor_value_info(f"score_{stride}", TensorProto.FLOAT, [anchors, 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{stride}", TensorProto.FLOAT, [anchors, 4]))
        keypoints.append(helper.make_tensor_value_info(f"kps_{stride}", TensorProto.FLOAT, [anchors, 10]))
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    _save(nodes, [image], scores + boxes + keypoints, initializers, path)


def _make_pooled_linear(path: Path, input_name: str, size: int, out_dim: int, bias: np.ndarray) -> None:
    """GlobalAveragePool -> Gemm: an image-in, vector-out graph of the given signature."""
    initializers = [_const("w", RNG.normal(0, 0.05, (3, out_dim))), _const("b", bias)]
    nodes = [
        helper.make_node("GlobalAveragePool", [input_name], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["output"]),
    ]
    image = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, size, size])
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, out_dim])
    _save(nodes, [image], [output], initializers, path)


def make_fake_pack(folder: Path, *, with_recognition: bool = True) -> Path:
    folder.mkdir(parents=True)
    make_fake_scrfd(folder / "det_tiny.onnx")
    _make_pooled_linear(folder / "2d106det_tiny.onnx", "data", 192, 212, RNG.uniform(-0.6, 0.6, 212))
    if with_recognition:
        _make_pooled_linear(folder / "w600k_tiny.onnx", "input.1", 112, 512, RNG.normal(0, 1, 512))
    return folder


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("insightface")
    make_fake_pack(root / "models" / "tinypack")
    return root


@pytest.fixture(scope="module")
def analyzer(pack_root) -> FaceAnalyzer:
    return FaceAnalyzer("insightface", insightface_root=pack_root, pack="tinypack")


def _test_image() -> np.ndarray:
    image = np.zeros((640, 640, 3), dtype=np.uint8)
    x0, y0, x1, y1 = BRIGHT_BOX
    image[y0:y1, x0:x1] = 255
    return image


def test_router_takes_the_fakes_as_the_real_model_kinds(pack_root):
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.landmark import Landmark
    from insightface.model_zoo.scrfd import SCRFD

    folder = pack_root / "models" / "tinypack"
    detector = get_model(str(folder / "det_tiny.onnx"), providers=["CPUExecutionProvider"])
    landmarks = get_model(str(folder / "2d106det_tiny.onnx"), providers=["CPUExecutionProvider"])
    recognition = get_model(str(folder / "w600k_tiny.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(detector, SCRFD) and detector.use_kps and detector.fmc == 3
    assert isinstance(landmarks, Landmark) and landmarks.taskname == "landmark_2d_106"
    assert isinstance(recognition, ArcFaceONNX)


def test_analyze_fills_every_field_and_records_the_models(analyzer):
    assert analyzer.backend == "insightface"
    assert analyzer.embedding_model == "arcface-tinypack" and analyzer.embedding_dim == 512
    faces = analyzer.analyze(_test_image())
    assert faces, "the fake detector fires on the bright square"
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    x0, y0, x1, y1 = BRIGHT_BOX
    for face in faces:  # every detection sits on the square (anchors lie at cell corners: one stride of slack)
        center_x, center_y = (face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2
        assert x0 - 32 <= center_x <= x1 and y0 - 32 <= center_y <= y1
    face = faces[0]
    assert face.kps5.shape == (5, 2) and face.kps5.dtype == np.float32
    assert face.kps5[0, 0] < face.kps5[1, 0] and face.kps5[3, 0] < face.kps5[4, 0]
    assert face.landmarks.shape == (106, 2)
    assert face.embedding.shape == (512,) and np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    assert all(np.isfinite([face.yaw, face.pitch, face.roll]))
    assert set(face.expression_scores) >= {face.expression}
    assert face.backend == "insightface"
    assert face.models["bbox"] == "insightface-tinypack/det_tiny.onnx"
    assert face.models["landmarks"] == "insightface-tinypack/2d106det_tiny.onnx"
    assert face.models["embedding"] == "arcface-tinypack"
    assert analyzer.distance(face.embedding, face.embedding) == pytest.approx(0.0, abs=1e-6)
    assert 0 < analyzer.same_person_threshold < 2


def test_detect_gives_boxes_only_and_no_face_on_a_dark_image(analyzer):
    detected = analyzer.detect(_test_image())
    assert detected and detected[0].embedding is None and detected[0].landmarks is None
    assert analyzer.detect(np.zeros((480, 640, 3), dtype=np.uint8)) == []


def test_auto_picks_insightface_from_the_environment_and_embedded_without(pack_root, monkeypatch):
    monkeypatch.setenv(INSIGHTFACE_ROOT_ENV, str(pack_root / "models" / "tinypack"))
    assert FaceAnalyzer("auto").backend == "insightface"
    monkeypatch.delenv(INSIGHTFACE_ROOT_ENV)
    assert FaceAnalyzer("auto").backend == "embedded"
    assert FaceAnalyzer("auto", insightface_root=pack_root / "absent", pack="buffalo_l").backend == "embedded"
    with pytest.raises(TypeError, match="valid"):
        FaceAnalyzer("embedded", pack="buffalo_l")


def test_missing_folder_and_incomplete_pack_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv(INSIGHTFACE_ROOT_ENV, raising=False)
    with pytest.raises(ValueError, match="insightface_root"):
        FaceAnalyzer("insightface")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        FaceAnalyzer("insightface", insightface_root=tmp_path / "nowhere")
    incomplete = make_fake_pack(tmp_path / "partial", with_recognition=False)
    with pytest.raises(FileNotFoundError, match="recognition"):
        FaceAnalyzer("insightface", insightface_root=incomplete)


def test_insightface_asks_onnxruntime_for_cuda_only_where_onnxruntime_has_it(pack_root, monkeypatch):
    import insightface.model_zoo
    import onnxruntime

    from dynamicid.faces.threads import CUDA_PROVIDER, onnxruntime_cuda

    if onnxruntime_cuda():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ValueError, match="install onnxruntime-gpu in place of onnxruntime") as error:
        FaceAnalyzer("insightface", insightface_root=pack_root, pack="tinypack", device="cuda")
    assert "\n" not in str(error.value)

    asked = []
    real_get_model = insightface.model_zoo.get_model
    monkeypatch.setattr(
        insightface.model_zoo,
        "get_model",
        lambda path, **kw: asked.append(kw["providers"]) or real_get_model(path, **kw),
    )
    FaceAnalyzer("insightface", insightface_root=pack_root, pack="tinypack", device="auto")
    assert asked and all(providers == ["CPUExecutionProvider"] for providers in asked)
    # FAKE: an onnxruntime-gpu (none here): its sessions then fall back to the CPU, with ONNX Runtime's warning.
    available = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_PROVIDER, *available])
    asked.clear()
    FaceAnalyzer("insightface", insightface_root=pack_root, pack="tinypack", device="auto")
    assert asked and all(providers == [CUDA_PROVIDER, "CPUExecutionProvider"] for providers in asked)
