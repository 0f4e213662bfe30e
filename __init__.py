"""DynamicID toolkit: curation, training and inference for zero-shot multi-person personalization."""

__version__ = "0.1.0"


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]):
    """A package's module `__getattr__` that imports each exported name (`modules`: module -> its names) from its
    module on first use, so that importing the package (e.g. for a command line's --help) loads no library."""
    from importlib import import_module

    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(where[name]), name)

    return __getattr__
