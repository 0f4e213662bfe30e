"""The browser app (`dynamicid-app`): generation with drawn boxes and per-person expressions, and a dataset viewer.

It uses the library's public API only: `dynamicid.infer` for generation, `dynamicid.faces` for the reference
previews, and the curated dataset's Parquet files.
"""
