"""collab's decoding package: decoding-time collaboration of experts.

- Co-LLM (``decoding.system.CoLLMDecoder``, ``type: codecode`` in a spec): a
  base model with a learned deferral head that lets domain experts write the
  tokens it defers (Shen et al. 2024). Train with ``collab decode train``
  (``decoding.train``), pick the threshold with ``collab decode tune``
  (``decoding.tune``).

Importing this package does not import torch.
"""

from decoding.system import (
    CoDecoder,
    CoDecoderSystemType,
    CoLLMDecoder,
    TokenizerMismatchError,
)

__all__ = ["CoDecoder", "CoDecoderSystemType", "CoLLMDecoder", "TokenizerMismatchError"]
