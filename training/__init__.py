"""Training side: CSM (transformers' CsmForConditionalGeneration) on the ingest pipeline's WebDataset shards.

Entry points: `training.train.run(manifest, cfg)` (plain function, runs under torchrun) and the Prefect flow
`flows/train.py:train`. The config lives in `training.config.TrainConfig`.
"""
