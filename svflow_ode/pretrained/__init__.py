"""Convert Hugging Face transformers models (BERT, GPT-2, Llama, Qwen2) into SVFlow models."""

from .convert import SUPPORTED, from_pretrained
from .layers import RMSNorm, TokenEmbedding

__all__ = ["SUPPORTED", "from_pretrained", "RMSNorm", "TokenEmbedding"]
