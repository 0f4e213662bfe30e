"""The real ComfyUI engine for tests, in this process: unpacked from ../shared/vendor, started once, the node pack
`comfyui/` loaded as a custom node, tiny FAKE model types registered (ComfyUI recognises a checkpoint's family by
its real widths, so a tiny random one needs its own entry).

ComfyUI imports torchvision at start. PyPI's Linux torchvision is a CUDA build whose C++ operators do not load
beside the CPU torch, and an importable broken torchvision also breaks transformers' imports; so it is never put
in .venv. When no working torchvision is importable, the pinned wheel (requirements/comfyui-torchvision.txt) is
installed into .cache/comfyui-torchvision (git-ignored) and made importable here only, after its two operator
schemas are defined (the vendor README's workaround: its Python side then loads; its C++ ops stay unused).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
VENDOR_TARBALL = REPO.parent / "shared" / "vendor" / "comfyui-0.3.64-a125cd8.tar.gz"
TORCHVISION_REQUIREMENT = REPO / "requirements" / "comfyui-torchvision.txt"
TORCHVISION_DIR = REPO / ".cache" / "comfyui-torchvision"
PACK = REPO / "comfyui"
EXTRA_NODES = ("nodes_flux.py", "nodes_sd3.py")  # FluxGuidance, EmptySD3LatentImage: the Flux example uses them

TINY_CLIP = {  # ComfyUI's CLIP-L text config at tiny widths (its tokenizer's real 49408-token vocabulary)
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "hidden_act": "quick_gelu",
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
}


TINY_T5 = {  # ComfyUI's T5-XXL config at tiny widths (its tokenizer's real 32128-token vocabulary)
    "d_ff": 37,
    "d_kv": 8,
    "d_model": 32,
    "num_heads": 4,
    "num_layers": 2,
    "dense_act_fn": "gelu_pytorch_tanh",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "model_type": "t5",
    "relative_attention_num_buckets": 32,  # ComfyUI's T5 always has 32
    "vocab_size": 32128,
}


_TORCHVISION_SCHEMAS: list[Any] = []


def make_torchvision_importable() -> None:
    """Use a working torchvision if there is one; else the pinned CUDA wheel with its operator schemas defined."""
    works = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0
    if works:
        return
    if not (TORCHVISION_DIR / "torchvision").is_dir():
        TORCHVISION_DIR.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="torchvision-", dir=TORCHVISION_DIR.parent))
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        subprocess.run([*pip, "--target", str(staging), "-r", str(TORCHVISION_REQUIREMENT)], check=True)
        try:
            staging.rename(TORCHVISION_DIR)  # whole or not at all: a parallel test run may have been first
        except OSError:
            shutil.rmtree(staging)
    if not _TORCHVISION_SCHEMAS:
        schemas = torch.library.Library("torchvision", "DEF")  # kept alive: the definitions last as long as it does
        schemas.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        schemas.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SCHEMAS.append(schemas)
    sys.path.insert(0, str(TORCHVISION_DIR))


@dataclass
class Engine:
    """ComfyUI as imported here: its modules, its folders, the loaded pack, an executor with a stub server."""

    root: Path
    base: Path
    pack: ModuleType
    modules: dict[str, ModuleType] = field(default_factory=dict)
    safe_globals: list[Any] = field(default_factory=list)  # torch.load's allow-list before ComfyUI extended it

    def __getattr__(self, name: str) -> ModuleType:
        try:
            return self.modules[name]
        except KeyError:
            raise AttributeError(name) from None

    def close(self) -> None:
        """Free the models, take ComfyUI off sys.path, and give torch.load its allow-list back."""
        self.model_management.unload_all_models()
        gc.collect()
        sys.path.remove(str(self.root))
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(self.safe_globals)

    def pack_module(self, name: str) -> ModuleType:
        return importlib.import_module(f"{self.pack.__name__}.{name}")

    def executor(self) -> Any:
        return self.execution.PromptExecutor(StubServer(), cache_type=False)

    def run(self, executor: Any, prompt: dict[str, Any]) -> tuple[bool, Any, dict[str, Any]]:
        """Validate and execute an API-format workflow: (valid, validation error or the last error message, outputs)."""
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            return False, {"error": error, "node_errors": node_errors}, {}
        executor.execute(prompt, prompt_id, {}, outputs)
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        return True, errors[-1] if errors else None, executor.history_result["outputs"]


class StubServer:
    """What PromptExecutor calls on the server (no client connected: nothing is sent)."""

    client_id = None
    last_node_id = None

    def send_sync(self, event: str, data: dict[str, Any], sid: Any = None) -> None:
        pass


def start(workdir: Path) -> Engine:
    """Unpack ComfyUI under `workdir`, import it (CPU), register the tiny model types, load the node pack."""
    make_torchvision_importable()
    safe_globals = torch.serialization.get_safe_globals()
    with tarfile.open(VENDOR_TARBALL) as archive:
        archive.extractall(workdir, filter="data")
    root, base = workdir / "ComfyUI", workdir / "base"
    folders = ("checkpoints", "diffusion_models", "text_encoders", "vae", "dynamicid")
    for folder in (*(f"models/{f}" for f in folders), "custom_nodes", "input", "output", "temp"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "dynamicid").symlink_to(PACK, target_is_directory=True)
    sys.path.insert(0, str(root))
    import_comfy(root)

    cli_args = importlib.import_module("comfy.cli_args")  # command-line parsing stays off: the defaults, then ours
    cli_args.args.cpu = True
    cli_args.args.base_directory = str(base)
    names = ["folder_paths", "comfy.model_management", "nodes", "execution", "comfy.sd", "comfy.utils"]
    modules = {name.rsplit(".", 1)[-1]: importlib.import_module(name) for name in names}
    register_tiny_model_types()

    for extra in EXTRA_NODES:
        if not asyncio.run(
            modules["nodes"].load_custom_node(str(root / "comfy_extras" / extra), module_parent="comfy_extras")
        ):
            raise RuntimeError(f"ComfyUI could not load its comfy_extras/{extra}")
    pack_path = str(base / "custom_nodes" / "dynamicid")
    if not asyncio.run(modules["nodes"].load_custom_node(pack_path)):
        raise RuntimeError(f"ComfyUI could not load the node pack {PACK}")
    return Engine(root, base, sys.modules[pack_path.replace(".", "_x_")], modules, safe_globals)


def import_comfy(root: Path) -> None:
    """Import ComfyUI's `comfy` (a namespace package) from `root`, not a regular package of that name on sys.path:
    pytest puts the parent of a checkout named `comfy` there (the repository root is itself a package)."""
    shadows = [p for p in sys.path if p != str(root) and (Path(p or ".") / "comfy" / "__init__.py").is_file()]
    if "comfy" in sys.modules and not str(sys.modules["comfy"].__path__[0]).startswith(str(root)):
        del sys.modules["comfy"]
    kept = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in shadows]
    try:
        importlib.import_module("comfy")
    finally:
        sys.path[:] = kept


def register_tiny_model_types() -> None:
    """ComfyUI model types for the tiny FAKE bases: SD 1.5 and SDXL layouts at 32/64 channels, 32 norm groups."""
    from comfy import sd1_clip, supported_models, supported_models_base

    tiny_clip = functools.partial(
        sd1_clip.SD1ClipModel,
        # as SD 1.5's checkpoint CLIP: the pooled output unprojected (the checkpoint has no text projection)
        clip_model=functools.partial(
            sd1_clip.SDClipModel, textmodel_json_config=TINY_CLIP, return_projected_pooled=False
        ),
    )

    class TinySD15(supported_models.SD15):
        unet_config = {  # noqa: RUF012 (ComfyUI's convention)
            "context_dim": 32,
            "model_channels": 32,
            "use_linear_in_transformer": False,
            "adm_in_channels": None,
            "use_temporal_attention": False,
        }

        def clip_target(self, state_dict=None):
            return supported_models_base.ClipTarget(sd1_clip.SD1Tokenizer, tiny_clip)

    class TinySDXL(supported_models.SDXL):
        unet_config = {  # noqa: RUF012
            "model_channels": 32,
            "use_linear_in_transformer": True,
            "context_dim": 64,
            "adm_in_channels": TINY_TEXT_WIDTH + 6 * 256,
            "use_temporal_attention": False,
        }
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}  # noqa: RUF012

    supported_models.models[:0] = [TinySD15, TinySDXL]
    detect_tiny_flux()
    tiny_flux_text_encoders()


def tiny_flux_text_encoders() -> None:
    """FLUX.1's text encoders as ComfyUI builds them (CLIP-L, pooled output unprojected; T5-XXL), at tiny widths:
    `DualCLIPLoader` with type `flux` loads the tiny files the tests write."""
    from comfy import sd1_clip
    from comfy.text_encoders import flux, t5

    def tiny_flux_clip(dtype_t5=None, t5xxl_scaled_fp8=None):
        class TinyFluxClip(flux.FluxClipModel):
            def __init__(self, device="cpu", dtype=None, model_options=None):
                torch.nn.Module.__init__(self)
                options = {"device": device, "dtype": dtype, "model_options": model_options or {}}
                self.clip_l = sd1_clip.SDClipModel(
                    textmodel_json_config=TINY_CLIP, return_projected_pooled=False, **options
                )
                self.t5xxl = sd1_clip.SDClipModel(  # as ComfyUI's T5XXLModel, with the tiny config
                    textmodel_json_config=TINY_T5, special_tokens={"end": 1, "pad": 0}, model_class=t5.T5, **options
                )
                self.dtypes = {dtype}

        return TinyFluxClip

    flux.flux_clip = tiny_flux_clip


TINY_FLUX_AXES = [4, 4, 8]  # tiny-random-flux's RoPE axes (`dynamicid.testing.build_tiny_random_flux`)


def detect_tiny_flux() -> None:
    """ComfyUI detects FLUX.1 by its keys and then fixes its widths (3072 wide, 24 heads, 4096-wide T5 states,
    RoPE axes 16/56/56): for a narrower Flux state dict, take the widths from the weights' shapes instead."""
    from comfy import model_detection

    detect = model_detection.detect_unet_config
    if getattr(detect, "tiny_flux", False):
        return

    def detect_with_tiny_flux(state_dict, key_prefix, metadata=None):
        config = detect(state_dict, key_prefix, metadata=metadata)
        hidden = state_dict.get(f"{key_prefix}img_in.weight")
        if config is None or config.get("image_model") != "flux" or hidden is None:
            return config
        if hidden.shape[0] != config["hidden_size"]:
            head = state_dict[f"{key_prefix}double_blocks.0.img_attn.norm.key_norm.scale"].shape[0]
            config["hidden_size"], config["num_heads"] = hidden.shape[0], hidden.shape[0] // head
            config["context_in_dim"] = state_dict[f"{key_prefix}txt_in.weight"].shape[1]
            config["axes_dim"] = TINY_FLUX_AXES
        return config

    detect_with_tiny_flux.tiny_flux = True
    model_detection.detect_unet_config = detect_with_tiny_flux


TINY_TEXT_WIDTH = 32


def tiny_unet(family: str, seed: int = 0) -> torch.nn.Module:
    """A diffusers UNet with the layout of `family` at tiny widths and ComfyUI's 32 norm groups (seeded)."""
    from diffusers import UNet2DConditionModel

    shared = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 32}
    shared["block_out_channels"] = (32, 64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd15":
            return UNet2DConditionModel(
                **shared,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=TINY_TEXT_WIDTH,
                attention_head_dim=8,
            ).eval()
        return UNet2DConditionModel(
            **shared,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=2 * TINY_TEXT_WIDTH,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=TINY_TEXT_WIDTH + 6 * 256,
        ).eval()


def comfy_unet_state_dict(engine: Engine, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The diffusers UNet's weights under ComfyUI's (LDM) names, through ComfyUI's own key map."""
    config = unet.config
    levels, layers = len(config.block_out_channels), config.layers_per_block
    per_level = config.transformer_layers_per_block
    per_level = per_level if isinstance(per_level, (list, tuple)) else [per_level] * levels
    depths = [
        d if kind.startswith("CrossAttn") else 0 for d, kind in zip(per_level, config.down_block_types, strict=True)
    ]
    unet_config = {
        "num_res_blocks": [layers] * levels,
        "channel_mult": [c // config.block_out_channels[0] for c in config.block_out_channels],
        "transformer_depth": [d for d in depths for _ in range(layers)],
        "transformer_depth_output": [d for d in depths for _ in range(layers + 1)],
        "transformer_depth_middle": per_level[-1],
    }
    key_map = engine.utils.unet_to_diffusers(unet_config)
    state = {k: v for k, v in unet.state_dict().items() if ".processor." not in k}
    converted = {key_map[k]: v.clone() for k, v in state.items()}
    if len(converted) != len(state):
        raise ValueError("ComfyUI's key map sends two diffusers weights to one name")
    return converted
