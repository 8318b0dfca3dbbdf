"""Serving LLaVA-UHD: ``llava-uhd ask`` (`llava_uhd.serve.ask`)."""
