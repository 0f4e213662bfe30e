"""The dataset card (OUT_DIR/README.md): YAML `configs` + `dataset_info` as `datasets` writes them, from the schema."""

from __future__ import annotations

from pathlib import Path

from dynamicid.schemas import (
    ANCHOR_CAPTION_TEMPLATE,
    DATASET_COLUMNS,
    EXPRESSIONS,
    FACE_PROMPT_TEMPLATE,
    POSE_BINS,
    dataset_feature_dicts,
)


def card_metadata(num_examples: int, num_bytes: int) -> dict:
    """The card's YAML header: what `DatasetCardData`, `MetadataConfigs` and `DatasetInfo._to_yaml_dict` make of
    the schema (tests/test_curation_dataset.py holds it equal to theirs), written without importing `datasets`:
    that import cost every build's driver about half a CPU-second."""
    features = [{"name": name, **_yaml_feature(feature)} for name, feature in dataset_feature_dicts().items()]
    return {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": {
            "features": features,
            "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": num_examples}],
        },
        "tags": ["faces", "dynamicid"],
    }


def _captions(summary: dict) -> str:
    model = summary.get("caption_model")
    return f"scene captions of the crops by `{model}`" if model else f"the template `{ANCHOR_CAPTION_TEMPLATE}`"


def _yaml_feature(feature: dict) -> dict:
    """One serialised feature (`Features.to_dict` form) in the card's YAML form (`Features._to_yaml_list`)."""
    kind = feature.get("_type")
    if kind is None:  # a struct: a plain dict of fields
        return {"struct": [{"name": name, **_yaml_feature(field)} for name, field in feature.items()]}
    if kind == "Value":
        return {"dtype": feature["dtype"]}
    if kind == "Image":
        return {"dtype": "image"}
    if kind == "ClassLabel":
        return {"dtype": {"class_label": {"names": {str(i): name for i, name in enumerate(feature["names"])}}}}
    if kind == "List":
        item = _yaml_feature(feature["feature"])
        listed = {"list": item["dtype"] if list(item) == ["dtype"] else item}
        return {**listed, "length": feature["length"]} if "length" in feature else listed
    raise ValueError(f"no YAML form for feature type {kind!r}")


def _grouping_note(summary: dict) -> str:
    grouping = summary.get("grouping")
    if not grouping:
        return ""
    small = len(grouping["small_groups"])
    return (
        f"\n\nIdentities were formed from a flat folder (`--cluster`) by {grouping['method']}; same-person distance "
        f"{grouping['threshold']} of the `{summary['backend']}` backend. {grouping['groups']} groups, {small} of them "
        "with one or two photos (listed in `summary.json` under `grouping.small_groups`)."
    )


def write_card(out_dir: Path, summary: dict, num_bytes: int) -> None:
    import yaml

    meta = yaml.safe_dump(card_metadata(summary["kept"], num_bytes), sort_keys=False, allow_unicode=True)
    columns = "\n".join(f"| `{c.name}` | {c.type} | {c.doc} |" for c in DATASET_COLUMNS)
    reasons = (
        "\n".join(f"| `{k}` | {v} |" for k, v in sorted(summary["rejected_by_reason"].items())) or "| (none) | 0 |"
    )
    text = f"""---
{meta}---

# Face dataset curated with dynamicid-curate

{summary["kept"]} aligned {summary["config"]["crop_size"]}x{summary["config"]["crop_size"]} face crops of
{summary["identities"]} identities, from {summary["scanned"]} files scanned in `{summary["photos_dir"]}`
({summary["rejected"]} rejected; `rejects.parquet` says why for each). Face backend `{summary["backend"]}`,
identity embeddings from `{summary["embedding_model"]}`. Captions: {_captions(summary)}.

```python
from datasets import load_dataset

ds = load_dataset("path/to/this/folder", split="train")
row = ds[0]  # row["image"] is a PIL image; expression and pose_bin are ClassLabels
print(row["identity"], ds.features["expression"].int2str(row["expression"]), row["face_prompt"])
```

## Columns

| column | type | meaning |
|---|---|---|
{columns}

Expressions: {", ".join(EXPRESSIONS)}. Pose bins (yaw, degrees): {"; ".join(f"{p.name} [{p.yaw_min}, {p.yaw_max})" for p in POSE_BINS)}.
Face prompt: `{FACE_PROMPT_TEMPLATE}`.

## Files

- `data/train-XXXXX-of-YYYYY.parquet`: the rows, sorted by identity then source path.
- `identities.parquet`: one row per identity (counts, expression x pose grid coverage, mean embedding).
- `rejects.parquet`: every scanned file that is not in the dataset: `source_path`, `stage`, `reason`, `detail`.
- `summary.json`: counts, settings and per-stage timings of the run; `report.html`: contact sheets.

## Rejected files by reason

| reason | files |
|---|---|
{reasons}

## How it was made

`dynamicid-curate build` (DynamicID toolkit): scan, detect, identify (the folder's dominant embedding
cluster), dedupe (identical bytes, perceptual hash of the aligned face, embedding near-duplicates incl.
mirrors; the largest and sharpest copy kept), align (FFHQ-style crop with context; faces the crop would
enlarge more than {summary["config"]["max_upscale"]:g}x rejected as `too_small`), label, select (at most
{summary["config"]["per_identity"]} per identity: the 7 expressions x 5 poses grid first, then the most
different faces), write.{_grouping_note(summary)} The photos' own licences apply to the crops.
"""
    (out_dir / "README.md").write_text(text, encoding="utf-8")
