"""Convert Hugging Face transformers models (BERT, GPT-2, Llama, Qwen2) into SVFlow models."""

from .convert import SUPPORTED, from_pretrained
from ..embedding import TokenEmbedding
from .layers import RMSNorm
from .student import student

__all__ = ["SUPPORTED", "from_pretrained", "RMSNorm", "TokenEmbedding", "student"]
