"""DynamicID toolkit: curation, training and inference for zero-shot multi-person image personalization."""

import logging
from collections.abc import Callable
from importlib import import_module
from typing import Any

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A package's `__getattr__` that imports each public name (name -> module) on first use."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(exports[name]), name)

    return __getattr__


class _TorchvisionNotice(logging.Filter):
    """transformers 5 warns on every `CLIPImageProcessor` import (diffusers' pipelines import it) that torchvision is
    missing and it uses the PIL processor, which is what this project wants (torchvision is not installed on
    purpose): the notice is dropped, and transformers' other warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionNotice())
