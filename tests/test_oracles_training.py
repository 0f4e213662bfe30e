"""The training signal checked against METHOD.md's formulas computed here (tests/oracles.py), not by the code.

Real photos (../shared/data/faces) through the real face layer give the dataset rows; the base is the tiny-random
FAKE and the DynamicID weights are random FAKEs (`dynamicid.testing`): what is checked is what each stage
feeds its models and how the losses are formed, which does not need trained weights.
"""

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import oracles
import pytest
import torch
from safetensors.torch import load_file

from dynamicid.faces import FaceAnalyzer, ffhq_align, load_image, transform_points
from dynamicid.infer import DynamicIDPipeline, Person
from dynamicid.models import IMR, FaceEncoder, KeypointEncoder, load_dynamicid
from dynamicid.models.base import load_base_model
from dynamicid.models.conditioning import Conditioner
from dynamicid.schemas import RECONFIGURE_UNET_PROMPT
from dynamicid.testing import random_parts, save_random_weights
from dynamicid.train.anchor import AnchorObjective, train_anchor
from dynamicid.train.cache_tokens import cache_tokens
from dynamicid.train.config import AnchorConfig, ReconfigureConfig
from dynamicid.train.data import ANCHOR_COLUMNS, AnchorSamples, load_curated
from dynamicid.train.reconfigure import train_reconfigure
from dynamicid.train.runner import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDENTITY = "John_Salley"  # 150x150 colour photos: small, so the face layer is quick
CROP = 512


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer("embedded")


def identity_photos(shared_faces, analyzer, identity: str) -> list:
    """(path, RGB pixels, largest face) of the first four photos of one person."""
    found = []
    for path in sorted((shared_faces / "identities" / identity).iterdir())[:4]:
        rgb = np.asarray(load_image(path))
        found.append((path, rgb, analyzer.analyze(rgb)[0]))
    return found


@pytest.fixture(scope="module")
def photos(shared_faces, analyzer):
    return identity_photos(shared_faces, analyzer, IDENTITY)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, photos, analyzer) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dataset"), {IDENTITY: photos}, analyzer)


def write_dataset(folder: Path, people: dict[str, list], analyzer) -> Path:
    """A dataset folder with the curated columns training reads: 512 crops, labels in crop pixels."""
    import datasets

    columns: dict[str, list] = {k: [] for k in ("identity", "source_sha256", "image", "kps5", "landmarks")}
    columns |= {k: [] for k in ("embedding", "embedding_model", "face_prompt", "caption")}
    for identity, path, rgb, face in ((i, *photo) for i, photos in people.items() for photo in photos):
        crop, matrix = ffhq_align(rgb, face, size=CROP)
        columns["identity"].append(identity)
        columns["source_sha256"].append(path.name)
        columns["image"].append({"bytes": oracles.png_bytes(np.asarray(crop)), "path": None})
        columns["kps5"].append(transform_points(face.kps5, matrix).tolist())
        columns["landmarks"].append(transform_points(face.landmarks, matrix).tolist())
        columns["embedding"].append(np.asarray(face.embedding, dtype=np.float32).tolist())
        columns["embedding_model"].append(analyzer.embedding_model)
        columns["face_prompt"].append(oracles.face_prompt(face.expression, face.pose_bin))
        columns["caption"].append(f"a photo of a person, {face.expression} expression")
    table = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    (folder / "data").mkdir(parents=True)
    table.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="module")
def anchor_file(tmp_path_factory, analyzer) -> Path:
    parts = random_parts(load_base_model("tiny-random"), analyzer, seed=5)
    return save_random_weights(parts, tmp_path_factory.mktemp("anchor") / "weights.safetensors")


# ---- reconfiguration: DFM + LDC and their inputs ----


class Recorder:
    """Records what the keypoint encoder, the IMR, the VAE encoder and the UNet receive during a run."""

    def __init__(self, base):
        self.calls: list[tuple[str, dict]] = []
        self.handles = [
            torch.nn.modules.module.register_module_forward_hook(self._module),
            base.vae.encoder.register_forward_pre_hook(self._vae),
            base.unet.register_forward_hook(self._unet, with_kwargs=True),
        ]

    def _module(self, module, args, output):
        if isinstance(module, KeypointEncoder):
            self.calls.append(("kpe", {"maps": args[0].detach().clone(), "out": output.detach().flatten(1).clone()}))
        elif isinstance(module, IMR):
            self.calls.append(("imr", {"args": [a.detach().clone() for a in args], "out": output.detach().clone()}))

    def _vae(self, module, args):
        self.calls.append(("vae", {"pixels": args[0].detach().clone()}))

    def _unet(self, module, args, kwargs, output):
        record = {"sample": args[0].detach().clone(), "t": args[1].detach().clone()}
        record |= {"states": kwargs["encoder_hidden_states"].detach().clone(), "grad": torch.is_grad_enabled()}
        self.calls.append(("unet", record))

    def close(self):
        for handle in self.handles:
            handle.remove()

    def training_step(self) -> dict[str, dict]:
        """The calls of the one training step (its second UNet call is the only one with gradients)."""
        index = next(i for i, (kind, c) in enumerate(self.calls) if kind == "unet" and c["grad"])
        step: dict[str, dict] = {"unet_pred": self.calls[index][1]}
        for kind, call in reversed(self.calls[:index]):
            name = "unet_ref" if kind == "unet" else kind
            if name not in step:
                step[name] = call
            if len(step) == 5:
                return step
        raise AssertionError(f"incomplete training step: {sorted(step)}")


# Unequal and not reciprocal, so a swapped or dropped weight shows (METHOD.md's 1:1 is the default, tested below).
DFM_LDC_WEIGHTS = {"dfm_weight": 3.0, "ldc_weight": 0.5}


@pytest.fixture(scope="module")
def reconfigure_run(tmp_path_factory, dataset_dir, anchor_file):
    tokens_dir = tmp_path_factory.mktemp("tokens")
    cache_tokens(anchor_file, dataset_dir, tokens_dir, base_model="tiny-random")
    config = ReconfigureConfig(
        base_model="tiny-random",
        dataset=str(dataset_dir),
        anchor=str(anchor_file),
        tokens=str(tokens_dir),
        output_dir=str(tmp_path_factory.mktemp("reconfigure")),
        resolution=32,
        max_steps=1,
        targets_per_identity=3,
        eval_samples=1,
        report_to="none",
        imr_dim=64,
        imr_heads=1,
        imr_dim_head=64,
        **DFM_LDC_WEIGHTS,
    )
    base = load_base_model("tiny-random")
    recorder = Recorder(base)
    try:
        train_reconfigure(config, base=base)
    finally:
        recorder.close()
    import datasets

    step = recorder.training_step()
    rows = datasets.load_dataset(str(dataset_dir), split="train")
    maps = [oracles.landmark_map(row["landmarks"], CROP) for row in rows]
    drawn = []  # the row of each map the keypoint encoder saw: source first, then the K targets
    for seen in step["kpe"]["maps"][:, 0]:
        matches = [i for i, expected in enumerate(maps) if torch.equal(seen, expected)]
        assert len(matches) == 1, "every landmark map is one row's landmarks rendered as METHOD.md says"
        drawn.append(matches[0])
    return {
        "base": base,
        "rows": rows,
        "step": step,
        "source": drawn[0],
        "targets": drawn[1:],
        "tokens": load_file(str(tokens_dir / "tokens.safetensors"))["tokens"],
        "metrics": next(row for row in read_metrics(config.output_dir) if "dfm" in row),
    }


def test_cached_tokens_are_the_anchor_face_encoder_on_each_rows_face(reconfigure_run, anchor_file):
    """Each row's cached tokens: the anchoring face encoder (no shortcut, METHOD.md's default) on the row's own ID
    embedding and the CLIP penultimate states of its face aligned as tests/oracles.py writes it out."""
    import datasets

    base, rows, tokens = (reconfigure_run[k] for k in ("base", "rows", "tokens"))
    encoder = load_dynamicid(anchor_file).build_face_encoder().eval()
    raw = rows.cast_column("image", datasets.Image(decode=False))
    expected = []
    with torch.no_grad():
        for i in range(len(rows)):
            rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(raw[i]["image"]["bytes"], np.uint8), 1), cv2.COLOR_BGR2RGB)
            clip = oracles.clip_penultimate(
                base.image_encoder, oracles.clip_input(oracles.arcface_crop(rgb, np.array(rows[i]["kps5"]), 224))
            )
            embedding = torch.tensor([rows[i]["embedding"]], dtype=torch.float32)
            expected.append(encoder(embedding, clip, shortcut=False)[0])
    expected = torch.stack(expected)
    assert tokens.shape == expected.shape == (len(rows), 4, 32)
    # The CLIP input differs from the oracle's by bilinear rounding (one grey level at most; measured 5e-5).
    torch.testing.assert_close(tokens, expected, rtol=0, atol=5e-4)
    assert (expected[0] - expected[1:]).abs().amax() > 0.05  # rows differ by far more than that


def test_the_unet_prompt_is_methods_fixed_prompt():
    assert oracles.reconfigure_unet_prompt() == RECONFIGURE_UNET_PROMPT


def test_reconfiguration_inputs_come_from_the_dataset_rows(reconfigure_run):
    """Landmark maps rendered from the rows' landmarks (fixture), pooled CLIP text of their face prompts, cached
    tokens of the source, the targets' images as latents."""
    import datasets

    base, rows, step, tokens = (reconfigure_run[k] for k in ("base", "rows", "step", "tokens"))
    source, targets = reconfigure_run["source"], reconfigure_run["targets"]
    drawn = [source, *targets]
    assert len(targets) == 3

    face_tokens, src_landmark, tgt_landmark, src_text, tgt_text = step["imr"]["args"]
    torch.testing.assert_close(face_tokens, tokens[[source]], rtol=0, atol=0)
    vectors = step["kpe"]["out"]
    torch.testing.assert_close(src_landmark, vectors[:1], rtol=0, atol=0)
    torch.testing.assert_close(tgt_landmark, vectors[1:], rtol=0, atol=0)
    prompts = [rows[i]["face_prompt"] for i in drawn]
    text = oracles.pooled_text(base.text_encoder, base.tokenizer, prompts)
    torch.testing.assert_close(src_text, text[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tgt_text, text[1:], rtol=1e-5, atol=1e-5)

    # The latents are the targets' images (512 crops resized to the training resolution, scaled to [-1, 1]).
    raw = rows.cast_column("image", datasets.Image(decode=False))
    pixels = []
    for i in targets:
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(raw[i]["image"]["bytes"], np.uint8), 1), cv2.COLOR_BGR2RGB)
        small = cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_AREA)
        pixels.append(torch.from_numpy(small.transpose(2, 0, 1).astype(np.float32)) / 127.5 - 1)
    torch.testing.assert_close(step["vae"]["pixels"], torch.stack(pixels), rtol=0, atol=1e-6)


def test_dfm_and_ldc_follow_the_method(reconfigure_run):
    """DFM = MSE(IMR tokens, target tokens); LDC = MSE(UNet(x_t, t, text + IMR tokens), UNet(x_t, t, text + target
    tokens)) with the fixed prompt; loss = dfm_weight * DFM + ldc_weight * LDC (default 1:1, METHOD.md).
    Expected values from the inputs, recomputed here."""
    method = " ".join(oracles.method_md().split())
    assert '("LDC"), weight 1:1' in method
    assert (ReconfigureConfig.dfm_weight, ReconfigureConfig.ldc_weight) == (1.0, 1.0)
    base, step, tokens, logged = (reconfigure_run[k] for k in ("base", "step", "tokens", "metrics"))
    ref, pred = step["unet_ref"], step["unet_pred"]
    targets = tokens[reconfigure_run["targets"]]  # the frozen face encoder's tokens of the target rows
    predicted = step["imr"]["out"]

    text = oracles.text_states(base.text_encoder, base.tokenizer, [oracles.reconfigure_unet_prompt()])
    text = text.expand(len(predicted), -1, -1)
    torch.testing.assert_close(ref["states"], torch.cat([text, targets], 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred["states"], torch.cat([text, predicted], 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(ref["sample"], pred["sample"]) and torch.equal(ref["t"], pred["t"])
    assert ref["sample"].shape == (3, 4, 4, 4) and ref["t"].shape == (3,)

    dfm = ((predicted.double() - targets.double()) ** 2).mean()
    with torch.no_grad():
        out_target = base.unet(ref["sample"], ref["t"], encoder_hidden_states=torch.cat([text, targets], 1)).sample
        out_pred = base.unet(ref["sample"], ref["t"], encoder_hidden_states=torch.cat([text, predicted], 1)).sample
    ldc = ((out_pred.double() - out_target.double()) ** 2).mean()
    assert logged["dfm"] == pytest.approx(float(dfm), rel=1e-5)
    assert logged["ldc"] == pytest.approx(float(ldc), rel=1e-4)
    weighted = DFM_LDC_WEIGHTS["dfm_weight"] * dfm + DFM_LDC_WEIGHTS["ldc_weight"] * ldc
    assert logged["loss"] == pytest.approx(float(weighted), rel=1e-4)


@pytest.mark.slow
def test_a_trained_imr_keeps_the_sources_identity_under_another_persons_motion(
    tmp_path, shared_faces, analyzer, photos, anchor_file
):
    """Reconfiguration trained on two people (sources and targets of the same person) for a few steps: a source's
    tokens edited towards the OTHER person's landmarks and face prompt stay closer to the source person's cached
    tokens than to the other person's. (After one step instead of 30, the second person's edits land nearer the
    first: checked once.)"""
    import datasets

    people = {IDENTITY: photos, "Colin_Powell": identity_photos(shared_faces, analyzer, "Colin_Powell")}
    dataset = write_dataset(tmp_path / "dataset", people, analyzer)
    cache_tokens(anchor_file, dataset, tmp_path / "tokens", base_model="tiny-random")
    config = ReconfigureConfig(
        **{"base_model": "tiny-random", "dataset": str(dataset), "anchor": str(anchor_file)},
        **{"tokens": str(tmp_path / "tokens"), "output_dir": str(tmp_path / "run"), "report_to": "none"},
        **{"resolution": 32, "max_steps": 30, "learning_rate": 2e-3, "targets_per_identity": 2, "eval_samples": 1},
        **{"imr_dim": 64, "imr_heads": 1, "imr_dim_head": 64, "progress": False},
    )
    base = load_base_model("tiny-random")
    weights = load_dynamicid(train_reconfigure(config, base=base))
    imr, keypoint_encoder = weights.build_imr().eval(), weights.build_keypoint_encoder().eval()

    rows = datasets.load_dataset(str(dataset), split="train")
    tokens = load_file(str(tmp_path / "tokens" / "tokens.safetensors"))["tokens"]
    person = torch.tensor([list(people).index(name) for name in rows["identity"]])
    centres = torch.stack([tokens[person == p].mean(0) for p in (0, 1)])
    with torch.no_grad():
        landmarks = keypoint_encoder(torch.stack([oracles.landmark_map(r["landmarks"], CROP) for r in rows])[:, None])
        landmarks = landmarks.flatten(1)
        text = oracles.pooled_text(base.text_encoder, base.tokenizer, list(rows["face_prompt"]))
        for source in range(len(rows)):
            for target in torch.nonzero(person != person[source]).flatten().tolist():
                edited = imr(
                    tokens[source : source + 1],
                    landmarks[[source]],
                    landmarks[[target]],
                    text[[source]],
                    text[[target]],
                )[0]
                own, other = (float(((edited - centres[p]) ** 2).mean()) for p in (person[source], person[target]))
                assert own < other, (source, target, own, other)


# ---- anchoring: condition dropping ----


def test_condition_dropping_rates_over_many_seeded_steps(dataset_dir):
    """5 % text only, 5 % ID only, 5 % both (release defaults); dropped text = the empty prompt, dropped ID = zero
    embedding + CLIP states of an all-zero image (the unconditional inputs of inference)."""
    base = load_base_model("tiny-random")
    config = AnchorConfig()
    drops = (config.drop_text, config.drop_id, config.drop_both)
    assert drops == (0.05, 0.05, 0.05)
    samples = AnchorSamples(load_curated(dataset_dir, ANCHOR_COLUMNS), Conditioner.from_parts(base).token_ids, 8)
    rows = [samples[i % len(samples)] for i in range(16)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    empty = oracles.text_states(base.text_encoder, base.tokenizer, [""])[0]
    caption_states = base.text_encoder(batch["input_ids"]).last_hidden_state.detach()
    zero_clip = oracles.clip_penultimate(base.image_encoder, torch.zeros(1, 3, 224, 224))[0]
    generator = torch.Generator().manual_seed(0)
    objective = AnchorObjective(base, torch.float32, drops)
    counts: Counter = Counter()
    steps = 150
    for _ in range(steps):
        inputs = objective.inputs(batch, generator, training=True)
        for i in range(len(rows)):
            no_text = torch.allclose(inputs["text"][i], empty, atol=1e-5)
            if not no_text:
                torch.testing.assert_close(inputs["text"][i], caption_states[i], rtol=1e-5, atol=1e-5)
            no_id = not inputs["id_embeds"][i].any()
            no_clip = torch.allclose(inputs["clip_embeds"][i], zero_clip, atol=1e-5)
            assert no_id == no_clip, "the ID embedding and the CLIP image are dropped together"
            if not no_id:
                torch.testing.assert_close(inputs["id_embeds"][i], batch["id_embeds"][i], rtol=0, atol=0)
            counts[(no_text, no_id)] += 1
    n = steps * len(rows)
    lo, hi = oracles.binomial_interval(n, 0.05)
    for kind in ((True, False), (False, True), (True, True)):
        assert lo <= counts[kind] <= hi, (kind, counts, (lo, hi))
    assert counts[(False, False)] == n - sum(counts[k] for k in ((True, False), (False, True), (True, True)))


@pytest.mark.parametrize("dropped", ["text", "id"])
def test_anchoring_runs_drop_the_conditions_the_config_names(dataset_dir, tmp_path, dropped):
    """train_anchor with one drop rate at 1 (the others 0): in its training step every sample has lost exactly that
    condition (text -> the empty prompt's states; ID -> a zero embedding), so the run's rates reach the objective."""
    base = load_base_model("tiny-random")
    seen: dict[str, torch.Tensor] = {}

    def observe(module, args, kwargs, output):
        if torch.is_grad_enabled() and isinstance(module, FaceEncoder):
            seen["id_embeds"] = args[0].detach().clone()
        elif torch.is_grad_enabled() and module is base.unet:
            seen["states"] = kwargs["encoder_hidden_states"].detach().clone()

    drops = {"drop_text": float(dropped == "text"), "drop_id": float(dropped == "id"), "drop_both": 0.0}
    config = AnchorConfig(
        **{"base_model": "tiny-random", "dataset": str(dataset_dir), "output_dir": str(tmp_path / "run")},
        **{"resolution": 32, "train_batch_size": 2, "max_steps": 1, "lora_rank": 4, "eval_samples": 1},
        **{"report_to": "none", **drops},
    )
    handle = torch.nn.modules.module.register_module_forward_hook(observe, with_kwargs=True)
    try:
        train_anchor(config, base=base)
    finally:
        handle.remove()
    import datasets

    rows = datasets.load_dataset(str(dataset_dir), split="train")
    text = seen["states"][:, :77]
    empty = oracles.text_states(base.text_encoder, base.tokenizer, [""])[0]
    id_embeds = seen["id_embeds"]
    assert id_embeds.shape[0] == text.shape[0] == 2
    for i in range(2):
        if dropped == "text":
            torch.testing.assert_close(text[i], empty, rtol=1e-5, atol=1e-5)
            assert any(torch.equal(id_embeds[i], torch.tensor(e)) for e in rows["embedding"])
        else:
            assert not id_embeds[i].any()
            captions = oracles.text_states(base.text_encoder, base.tokenizer, list(rows["caption"]))
            assert any(torch.allclose(text[i], c, rtol=1e-5, atol=1e-5) for c in captions)
            assert not torch.allclose(text[i], empty, atol=1e-3)


# ---- anchoring: the epsilon and v-prediction objectives ----


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_anchoring_loss_is_the_objectives_mse_with_text_then_id_tokens(dataset_dir, tmp_path, prediction_type):
    """One anchoring step: the UNet sees [caption text ; face-encoder tokens] and the loss is MSE(prediction,
    target), the noise recovered from x_t = sqrt(a_t) z + sqrt(1 - a_t) noise (SD 1.5's schedule, computed here);
    target: the noise (epsilon) or sqrt(a_t) noise - sqrt(1 - a_t) z (a base whose scheduler says v_prediction).
    The weights record the prediction type."""
    import datasets
    from diffusers import DDPMScheduler

    base = load_base_model("tiny-random")
    base.noise_scheduler = DDPMScheduler.from_config(base.noise_scheduler.config, prediction_type=prediction_type)
    with torch.no_grad():  # a FAKE VAE whose posterior has std ~3e-7: z is its mean, which a hook sees
        base.vae.quant_conv.weight[4:] = 0
        base.vae.quant_conv.bias[4:] = -30
    calls = []

    def observe(module, args, kwargs, output):
        if module is base.vae.quant_conv:
            calls.append(("z", output[:, :4].detach().clone()))
        elif isinstance(module, FaceEncoder):
            calls.append(("face", (args[0].detach().clone(), output.detach().clone())))
        elif module is base.unet and torch.is_grad_enabled():
            calls.append(("unet", (args[0], args[1], kwargs["encoder_hidden_states"], output.sample)))

    handle = torch.nn.modules.module.register_module_forward_hook(observe, with_kwargs=True)
    no_drops = {"drop_text": 0.0, "drop_id": 0.0, "drop_both": 0.0}
    config = AnchorConfig(
        **{"base_model": "tiny-random", "dataset": str(dataset_dir), "output_dir": str(tmp_path / "run")},
        **{"resolution": 32, "train_batch_size": 2, "max_steps": 1, "lora_rank": 4, "eval_samples": 1},
        **{"report_to": "none", **no_drops},
    )
    try:
        train_anchor(config, base=base)
    finally:
        handle.remove()
    step = next(i for i, (kind, _) in enumerate(calls) if kind == "unet")
    noisy, timesteps, states, prediction = (t.detach() for t in calls[step][1])
    id_embeds, tokens = next(c for kind, c in reversed(calls[:step]) if kind == "face")
    z = next(c for kind, c in reversed(calls[:step]) if kind == "z") * base.vae.config.scaling_factor

    rows = datasets.load_dataset(str(dataset_dir), split="train")
    embeddings = torch.tensor(rows["embedding"])
    drawn = [int(torch.nonzero((embeddings == e).all(1))[0, 0]) for e in id_embeds]
    captions = [rows[i]["caption"] for i in drawn]
    text = oracles.text_states(base.text_encoder, base.tokenizer, captions)
    torch.testing.assert_close(states, torch.cat([text, tokens], 1), rtol=1e-5, atol=1e-5)

    alpha = oracles.sd15_alphas_cumprod()[timesteps].view(-1, 1, 1, 1)
    noise = (noisy.double() - alpha.sqrt() * z.double()) / (1 - alpha).sqrt()
    target = noise if prediction_type == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * z.double()
    expected = ((prediction.double() - target) ** 2).mean()
    logged = next(row for row in read_metrics(config.output_dir) if "loss" in row)["loss"]
    assert logged == pytest.approx(float(expected), rel=1e-4)
    assert 0.5 < float(noise.std()) < 1.5, "the recovered noise is standard normal"
    assert load_dynamicid(Path(config.output_dir) / "weights.safetensors").metadata.prediction_type == prediction_type


def test_timesteps_are_uniform_over_the_training_schedule():
    """Both stages noise at t drawn uniformly from {0, ..., 999} (SD 1.5's DDPM schedule): each tenth of the range
    gets its binomial share of 20,000 draws, and x_t = sqrt(a_t) z + sqrt(1 - a_t) noise with a_t computed here."""
    base = load_base_model("tiny-random")
    latents = torch.randn(20000, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    drawn = base.base_family.objective(base.noise_scheduler).noised(latents, torch.Generator().manual_seed(1))
    noisy, noise, timesteps = drawn.noisy, drawn.noise, drawn.timesteps
    assert int(timesteps.min()) == 0 and int(timesteps.max()) == 999
    lo, hi = oracles.binomial_interval(len(timesteps), 0.1)
    counts = torch.bincount(timesteps // 100, minlength=10)
    assert len(counts) == 10 and all(lo <= int(c) <= hi for c in counts), counts
    alpha = oracles.sd15_alphas_cumprod()[timesteps].view(-1, 1, 1, 1)
    expected = alpha.sqrt() * latents.double() + (1 - alpha).sqrt() * noise.double()
    torch.testing.assert_close(noisy.double(), expected, rtol=1e-5, atol=1e-5)


# ---- the CLIP image input, training and inference ----


def test_training_and_inference_give_the_clip_encoder_the_same_input(photos, analyzer, tmp_path):
    """The same photo and keypoints: training's AnchorSamples and the pipeline's reference analysis both give
    arcface_align(photo, kps5, 224) + CLIP mean/std, as written out in tests/oracles.py."""
    path, rgb, face = photos[0]
    base = load_base_model("tiny-random")
    row = {"image": {"bytes": oracles.png_bytes(rgb)}, "kps5": face.kps5.tolist()}
    row |= {"embedding": face.embedding.tolist(), "caption": "a photo of a person"}
    training = Conditioner.from_parts(base).clip_input(
        AnchorSamples([row], Conditioner.from_parts(base).token_ids, 64)[0]["clip_pixel_values"][None]
    )

    parts = random_parts(base, analyzer)
    pipe = DynamicIDPipeline.from_base(base)
    pipe.set_dynamicid(parts.face_encoder, face_analyzer=analyzer)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    handle = pipe.image_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        pipe("a person", [Person(path)], num_inference_steps=1, height=64, width=64)
    finally:
        handle.remove()
    inference = seen[0][:1]  # the reference's face; the second image is the all-zero unconditional one
    assert not seen[0][1].any()

    expected = oracles.clip_input(oracles.arcface_crop(rgb, face.kps5, 224))
    assert training.shape == inference.shape == expected.shape == (1, 3, 224, 224)
    torch.testing.assert_close(training, inference, rtol=0, atol=1e-6)
    one_level = float(1 / 255 / oracles.CLIP_STD.min())  # bilinear rounding of an independently solved warp
    assert (training - expected).abs().max() <= one_level + 1e-6
    assert (training - expected).abs().mean() < 0.05 * one_level


def test_curated_crop_and_its_keypoints_give_the_photos_clip_input(photos, dataset_dir):
    """Training reads the 512 crop and its kps5 column: the face lands where the photo's own alignment puts it."""
    base = load_base_model("tiny-random")
    samples = AnchorSamples(load_curated(dataset_dir, ANCHOR_COLUMNS), Conditioner.from_parts(base).token_ids, 64)
    for index, (_, rgb, face) in enumerate(photos):
        training = Conditioner.from_parts(base).clip_input(samples[index]["clip_pixel_values"][None])
        expected = oracles.clip_input(oracles.arcface_crop(rgb, face.kps5, 224))
        inside = oracles.arcface_crop(np.full_like(rgb, 255), face.kps5, 224)[..., 0] == 255  # the photo's pixels
        difference = (training - expected).abs()[0].mean(0)[torch.from_numpy(inside)]
        # Two resamplings instead of one: small differences, far below any misplacement or colour swap.
        assert difference.mean() < 0.02, index  # measured 0.005..0.007 on these photos
