"""The two DynamicID training stages (CLI: dynamicid-train; `python -m dynamicid.train` under accelerate).

- `anchor`: SAA + face encoder (`train_anchor(AnchorConfig)`).
- `cache_tokens`: face tokens of every row from the frozen anchoring face encoder.
- `cache_prompts`: text embeddings of every prompt both stages use, so `--prompt-cache` trains without the text
  encoders.
- `reconfigure`: IMR + keypoint encoder (`train_reconfigure(ReconfigureConfig)`).
Shared pieces: `runner` (the one training loop: accelerate, run state, checkpoints, metrics, fixed evaluation),
`config` (settings), `data` (dataset checks and samples), `noise` (latents, noise, timesteps), `validation`
(sample images through `DynamicIDPipeline`), `eval_hook` (benchmark manifest). The conditioning itself is
`dynamicid.models.conditioning`, shared with inference.
"""
