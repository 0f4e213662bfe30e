"""DynamicID toolkit: curation, training and inference for zero-shot multi-person image personalization."""

import logging

__version__ = "0.1.0"


class _TorchvisionNotice(logging.Filter):
    """transformers 5 warns on every `CLIPImageProcessor` import (diffusers' pipelines import it) that torchvision is
    missing and it uses the PIL processor, which is what this project wants (torchvision is not installed on
    purpose): the notice is dropped, and transformers' other warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionNotice())
