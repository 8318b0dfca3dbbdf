"""Serving LLaVA-UHD: ``llava-uhd ask`` (`llava_uhd.serve.ask`), ``chat`` (`.chat`) and ``infer`` (`.infer`).

The commands share their options (`.options`), model loading (`.loading`) and generation (`.generation`: decoding
settings, batches, streaming); `.questions` reads and writes LLaVA's evaluation JSONL. Nothing here imports
training or evaluation code.
"""
