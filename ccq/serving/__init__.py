"""Serving packed checkpoints with inference engines.

- `tensor_parallel`: how one packed tensor is cut for tensor parallelism along 16x16 tile
  boundaries (pure torch, no engine needed; `ccq plan --tp` uses it too).
- `vllm_plugin`: the vLLM quantization method "ccq", loaded by vLLM through the
  `vllm.general_plugins` entry point; it is the only module here that imports vLLM.
"""
