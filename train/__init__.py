"""The two DynamicID training stages (CLI: dynamicid-train; `python -m dynamicid.train` under accelerate).

- `anchor`: SAA + face encoder (`train_anchor(AnchorConfig)`).
- `cache_tokens`: face tokens of every row from the frozen anchoring face encoder.
- `reconfigure`: IMR + keypoint encoder (`train_reconfigure(ReconfigureConfig)`).
Shared pieces: `config` (settings), `data` (dataset checks and samples), `conditioning` (frozen encoders),
`runner` (accelerate, run state, checkpoints, metrics), `validation` (sample images).
"""
