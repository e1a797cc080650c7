"""Output-quality evaluation (`qtool eval`): two models walked block by block in lockstep on the same token
windows, scored by perplexity, KL divergence to the reference and top-1 agreement (the job: qtool.jobs.evaluate)."""
