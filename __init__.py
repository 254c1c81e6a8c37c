"""longctx: distributed long-context training for decoder language models.

The repository root is this package; its folders are the subpackages:
``longctx.model`` (Llama-family decoder, Hugging Face checkpoints), ``longctx.attention``
(block-attention kernels and variants), ``longctx.positional`` (RoPE family and other
encodings), ``longctx.parallel`` (sequence parallelism), ``longctx.data``, ``longctx.trainer``
and ``longctx.launch`` (the ``longctx`` CLI and Ray orchestration).
"""

__version__ = "0.1.0"
