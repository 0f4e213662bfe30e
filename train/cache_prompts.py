"""Prompt embeddings of every text training uses, encoded once ahead of training (`dynamicid-train cache-prompts`),
so that both stages run with `--prompt-cache DIR` and never load the text encoders (FLUX.1's T5 alone is 9.5 GB).

What is cached, through the base family's `Conditioner` (one mechanism for SD 1.5, SDXL and Flux):
- each distinct caption of the dataset, the empty prompt (the anchoring stage's text drop) and the
  reconfiguration's fixed UNet prompt: `Conditioner.text_embeddings` (the states; SDXL and Flux also the pooled
  vector). SDXL's time ids and Flux's text ids are rebuilt at training time (`Conditioner.condition_from`).
- each distinct face prompt: `Conditioner.face_prompt_vectors` (the IMR's text input).

DIR/index.json lists the prompts in order and the cache's identity; DIR/prompts-NNNNN.safetensors hold
`states` (n, L, C) and `pooled` (n, P) of `shard_size` prompts each, DIR/face-prompts.safetensors `vectors`
(F, P); every file's header holds the identity too. Tensors are stored in the run's mixed-precision dtype (the
encoders run in it, as training runs them) and read lazily: safetensors files are memory-mapped and a sample
reads only its own prompt's rows, so a cache of 100k Flux captions (4 MB each in bf16) never sits in memory.

The identity: the dataset rows (fingerprint), its captions and face prompts (sha256), the base (its family and
its text encoders' and tokenizers' files, sizes and sampled content; a tiny FAKE by name and seed) and the mixed
precision. A cache whose identity differs from the run's is refused in one line naming what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dynamicid.clitools import progress_options
from dynamicid.models.base import load_base_model
from dynamicid.models.checkpoints import write_safetensors
from dynamicid.models.families import detect_family
from dynamicid.schemas import RECONFIGURE_UNET_PROMPT
from dynamicid.train.data import dataset_fingerprint, load_curated
from dynamicid.train.runner import PRECISION_DTYPES

PROMPT_COLUMNS = ("identity", "source_sha256", "caption", "face_prompt")
INDEX = "index.json"
FACE_PROMPTS = "face-prompts.safetensors"
FORMAT = 1
_SAMPLES, _SAMPLE_BYTES = 17, 1 << 16  # file content sampled for the base's identity


def _sampled_digest(path: Path) -> str:
    """sha256 of a file's size and 17 evenly spaced 64 KiB pieces: tells checkpoints apart without reading GBs."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        for i in range(_SAMPLES):
            handle.seek(max(0, size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def base_identity(base_model: str | Path, seed: int) -> str:
    """What the cached embeddings depend on in the base: its text encoders and tokenizers."""
    family = detect_family(base_model)
    if str(base_model) == family.tiny_name:
        return f"{family.tiny_name} seed {seed}"  # the FAKE's encoders are drawn from the run's seed
    folder = Path(base_model)
    digest = hashlib.sha256()
    for part in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(("text_encoder", "tokenizer"))):
        for path in sorted(p for p in part.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(folder)}\0{_sampled_digest(path)}\n".encode())
    return f"{family.name} text encoders {digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class CacheIdentity:
    """What a prompt cache was made from; compared field by field with a run's."""

    dataset_fingerprint: str
    texts_sha256: str
    base: str
    mixed_precision: str

    @classmethod
    def of(cls, rows: Any, base_model: str | Path, seed: int, mixed_precision: str) -> CacheIdentity:
        texts = hashlib.sha256()
        for caption, face_prompt in zip(rows["caption"], rows["face_prompt"], strict=True):
            texts.update(f"{caption}\0{face_prompt}\n".encode())
        return cls(dataset_fingerprint(rows), texts.hexdigest()[:16], base_identity(base_model, seed), mixed_precision)

    def header(self) -> dict[str, str]:
        return {"format": str(FORMAT), **dataclasses.asdict(self)}

    def check(self, cached: dict[str, str], path: Path) -> None:
        """One line naming the first thing that differs between the cache file's header and this run."""
        rerun = "rerun `dynamicid-train cache-prompts` for this run"
        if cached.get("format") != str(FORMAT):
            raise ValueError(f"{path} is not a prompt cache of format {FORMAT}; {rerun}")
        for what, field in (
            ("other dataset rows", "dataset_fingerprint"),
            ("other captions or face prompts", "texts_sha256"),
            ("another base model", "base"),
        ):
            if cached.get(field) != getattr(self, field):
                raise ValueError(
                    f"{path} was cached from {what} ({cached.get(field)}, this run: {getattr(self, field)}); {rerun}"
                )
        if cached.get("mixed_precision") != self.mixed_precision:
            raise ValueError(
                f"{path} was cached for --mixed-precision {cached.get('mixed_precision')}, this run has "
                f"{self.mixed_precision}; {rerun} with --mixed-precision {self.mixed_precision}"
            )


def training_prompts(rows: Any) -> tuple[list[str], list[str]]:
    """(the denoiser's prompts: captions, the empty prompt, the reconfiguration prompt; the face prompts), each
    distinct, in first-seen order."""
    prompts = dict.fromkeys([*rows["caption"], "", RECONFIGURE_UNET_PROMPT])
    return list(prompts), [p for p in dict.fromkeys(rows["face_prompt"]) if p is not None]


@torch.no_grad()
def cache_prompts(
    dataset: str | Path,
    output: str | Path,
    *,
    base_model: str,
    seed: int = 0,
    mixed_precision: str = "no",
    batch_size: int = 16,
    shard_size: int = 256,
    device: str | None = None,
    progress: bool = False,
) -> Path:
    """Write OUTPUT/index.json and the shards; returns the index's path. Only the text encoders are loaded."""
    if mixed_precision not in PRECISION_DTYPES:
        raise ValueError(f"mixed_precision {mixed_precision!r}; valid: {', '.join(PRECISION_DTYPES)}")
    rows = load_curated(dataset, PROMPT_COLUMNS)
    identity = CacheIdentity.of(rows, base_model, seed, mixed_precision)
    prompts, face_prompts = training_prompts(rows)
    family = detect_family(base_model)
    base = load_base_model(base_model, seed=seed, without=(family.denoiser_name, "vae", "image_encoder"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for module in base.modules():  # the text encoders, in the run's precision (as `cast_frozen` puts them)
        module.to(device, dtype=PRECISION_DTYPES[mixed_precision])
    conditioner = family.conditioner(base)
    folder = Path(output)
    (folder / INDEX).unlink(missing_ok=True)  # an older cache here is gone until the new one is complete
    shards = []
    for first in tqdm(
        range(0, len(prompts), shard_size),
        desc="cache-prompts",
        unit="shard",
        disable=not progress,
        **progress_options(),
    ):
        chunk = prompts[first : first + shard_size]
        parts = [
            conditioner.text_embeddings(conditioner.token_ids(chunk[i : i + batch_size]))
            for i in range(0, len(chunk), batch_size)
        ]
        tensors = {key: torch.cat([part[key] for part in parts]).cpu().contiguous() for key in parts[0]}
        name = f"prompts-{len(shards):05d}.safetensors"
        write_safetensors(tensors, folder / name, identity.header())
        shards.append(name)
    vectors = [
        conditioner.face_prompt_vectors(face_prompts[i : i + batch_size])
        for i in range(0, len(face_prompts), batch_size)
    ]
    if vectors:
        write_safetensors({"vectors": torch.cat(vectors).cpu().contiguous()}, folder / FACE_PROMPTS, identity.header())
    index = {
        **identity.header(),
        "shard_size": shard_size,
        "shards": shards,
        "prompts": prompts,
        "face_prompts": face_prompts,
    }
    partial = folder / f"{INDEX}.partial"
    partial.write_text(json.dumps(index, ensure_ascii=False) + "\n")
    return partial.replace(folder / INDEX)


class PromptCache:
    """A prompt cache checked against a run: each prompt's embeddings read lazily from the memory-mapped shards.

    Picklable (DataLoader workers open their own file handles on first use).
    """

    def __init__(self, folder: Path, index: dict[str, Any]):
        self.folder = folder
        self.shard_size = int(index["shard_size"])
        self.shards = list(index["shards"])
        self.position = {prompt: i for i, prompt in enumerate(index["prompts"])}
        self.face_position = {prompt: i for i, prompt in enumerate(index["face_prompts"])}
        self._handles: dict[str, Any] = {}

    @classmethod
    def open(
        cls, folder: str | Path, dataset: str | Path, base_model: str, seed: int, mixed_precision: str
    ) -> PromptCache:
        """The cache in `folder`, refused (one line) unless made from this dataset, base and precision."""
        from safetensors import safe_open

        folder = Path(folder)
        path = folder / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `dynamicid-train cache-prompts --output {folder}` first")
        index = json.loads(path.read_text())
        identity = CacheIdentity.of(load_curated(dataset, PROMPT_COLUMNS), base_model, seed, mixed_precision)
        identity.check(index, path)
        files = [folder / name for name in index["shards"]] + ([folder / FACE_PROMPTS] if index["face_prompts"] else [])
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(
                    f"{file} is missing from the prompt cache; rerun `dynamicid-train cache-prompts`"
                )
            with safe_open(str(file), framework="pt") as handle:
                identity.check(handle.metadata() or {}, file)
        return cls(folder, index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def _read(self, name: str, key: str, row: int) -> torch.Tensor:
        return self._open(name).get_slice(key)[row : row + 1][0]

    def embeddings(self, prompt: str) -> dict[str, torch.Tensor]:
        """One prompt's `Conditioner.text_embeddings` (without the batch axis)."""
        try:
            position = self.position[prompt]
        except KeyError:
            raise ValueError(
                f"prompt {prompt[:60]!r} is not in the prompt cache {self.folder}; rerun cache-prompts"
            ) from None
        shard, row = divmod(position, self.shard_size)
        name = self.shards[shard]
        keys = ("states", "pooled") if "pooled" in self._keys(name) else ("states",)
        return {key: self._read(name, key, row) for key in keys}

    def batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Stacked embeddings of `prompts` (`Conditioner.text_embeddings` of them)."""
        each = [self.embeddings(prompt) for prompt in prompts]
        return {key: torch.stack([e[key] for e in each]) for key in each[0]}

    def face_vectors(self, prompts: list[str]) -> torch.Tensor:
        """`Conditioner.face_prompt_vectors` of face prompts (N, P)."""
        missing = [p for p in prompts if p not in self.face_position]
        if missing:
            raise ValueError(
                f"face prompt {missing[0]!r} is not in the prompt cache {self.folder}; rerun cache-prompts"
            )
        return torch.stack([self._read(FACE_PROMPTS, "vectors", self.face_position[p]) for p in prompts])

    @property
    def face_dim(self) -> int:
        """Width of the face-prompt vectors (the IMR's text input)."""
        return int(self._open(FACE_PROMPTS).get_slice("vectors").get_shape()[-1])

    def _keys(self, name: str) -> list[str]:
        return list(self._open(name).keys())

    def _open(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]


def run_prompts(config: Any) -> PromptCache | None:
    """A training run's checked `--prompt-cache`, or None (the text encoders then encode the prompts)."""
    if config.prompt_cache is None:
        return None
    return PromptCache.open(config.prompt_cache, config.dataset, config.base_model, config.seed, config.mixed_precision)
