"""Data for LLaVA-UHD: LLaVA-format datasets, conversation templates, collation and length-grouped sampling
(`llava_data`, `templates`, `sampler`); synthetic fine-detail questions (`synthetic`) and the probe sets built on
them (`probes`); ordered batches made in parallel (`batches`)."""
