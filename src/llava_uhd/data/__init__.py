"""Training data for LLaVA-UHD: LLaVA-format datasets, conversation templates, collation and length-grouped
sampling (`llava_data`, `templates`, `sampler`)."""
