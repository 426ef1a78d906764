"""Inference engine: paged KV cache, prefix cache, continuous batching and batched sampling.

from astrai.core.engine import InferenceEngine, SamplingParams
engine = InferenceEngine(model, tokenizer)
print(engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))[0].text)
"""

from ..sizes import parse_bytes  # the one byte-size parser, also astrai.core.parse_bytes
from .attention_backend import AttentionBackend, AttentionMetadata, KernelPagedAttention, TorchPagedAttention
from .config import EngineConfig
from .engine import InferenceEngine
from .outputs import Completion, EngineError, Sample, StreamEvent, TokenLogprob
from .params import SamplingParams
from .request_output import END, LoopSink

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "Completion",
    "END",
    "EngineConfig",
    "EngineError",
    "InferenceEngine",
    "KernelPagedAttention",
    "LoopSink",
    "Sample",
    "SamplingParams",
    "StreamEvent",
    "TokenLogprob",
    "TorchPagedAttention",
    "parse_bytes",
]
