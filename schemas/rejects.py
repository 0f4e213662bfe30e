"""Reason codes for photos that do not reach the dataset (the `reason` column of rejects.parquet)."""

from __future__ import annotations

from enum import Enum


class RejectReason(str, Enum):
    UNDECODABLE = "undecodable"  # not an image, truncated, 0 bytes, decompression bomb
    UNREADABLE = "unreadable"  # permission error, symlink loop, I/O error
    OUTSIDE_PHOTOS_DIR = "outside_photos_dir"  # a link leading out of PHOTOS_DIR (or into OUT_DIR): not read
    BAD_FILE_NAME = "bad_file_name"  # a name that is not UTF-8 or holds control characters (shown escaped)
    TOO_SMALL = "too_small"  # the face is below the minimum size
    NO_FACE = "no_face"
    OTHER_PERSON = "other_person"  # faces found, none is the folder's person
    DUPLICATE_OF = "duplicate_of"  # written as "duplicate_of:<kept source_path>"
    LOW_QUALITY = "low_quality"  # blur or exposure below the thresholds
    OVER_QUOTA = "over_quota"  # the identity already has --per-identity images
    TOO_FEW_IMAGES = "too_few_images"  # the identity has fewer than --min-per-identity images
    NO_IDENTITY = "no_identity"  # a file directly in PHOTOS_DIR, outside any identity folder (folder mode)

    def __str__(self) -> str:
        return self.value
