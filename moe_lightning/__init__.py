"""moe-lightning's Python entry point for offline batch inference:

    from moe_lightning import LLM, SamplingParams
    llm = LLM("path/to/model-dir")
    completions = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""
from .llm import LLM
from .requests import Completion, Request, RequestError, SamplingParams

__all__ = ["LLM", "Completion", "Request", "RequestError", "SamplingParams"]
