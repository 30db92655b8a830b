"""Greedy generation with vLLM's offline engine (`LLM`) on CPU, and the same with `ccq.load`.

vLLM runs in a fresh process (`python -m tests_vllm.engine ARGS_JSON`): vLLM 0.32's CPU worker
scans every loaded module at start-up and fails on llvmlite's, which the ccq quantizer
(numba) has loaded in the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def vllm_greedy(model_dir, prompts: list[list[int]], max_tokens: int, **engine_args) -> list[dict]:
    """[{tokens, logprobs}] per prompt; logprobs of the chosen tokens, as vLLM reports them. With
    `moe_block=(layer, hidden)` (ERNIE-4.5-VL) one more entry, {moe_block: output of that MoE block on
    `moe_block_inputs(hidden)`}."""
    args = json.dumps({"model_dir": str(model_dir), "prompts": prompts, "max_tokens": max_tokens, **engine_args})
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    r = subprocess.run([sys.executable, "-m", "tests_vllm.engine", args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"vLLM run failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _fix_ernie_vl_cpu_rope() -> None:
    """vLLM 0.32 bug, CPU only: `MRotaryEmbedding.forward_cpu` passes `offsets` to `forward_native`,
    whose ERNIE-4.5-VL override takes (positions, query, key), so any ERNIE-4.5-VL forward on the CPU
    raises TypeError. The CUDA path (`forward_cuda`) is unaffected; the tests run the same
    `forward_native` vLLM's CPU path means to run."""
    from vllm.model_executor.layers.rotary_embedding.ernie45_vl_rope import Ernie4_5_VLRotaryEmbedding

    def forward_cpu(self, positions, query, key=None, offsets=None):
        assert offsets is None
        return self.forward_native(positions, query, key)

    Ernie4_5_VLRotaryEmbedding.forward_cpu = forward_cpu


def _fix_cpu_router_bias() -> None:
    """vLLM 0.32 bug, CPU only: `CPURouter` ignores `e_score_correction_bias` in plain softmax top-k
    routing (ERNIE-4.5's router statistics), where the CUDA router (`topk_softmax`) picks the top-k of
    softmax + bias and weights them by the softmax. The tests route as the CUDA path does."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    plain = CPURouter._compute_routing

    def compute_routing(self, hidden_states, router_logits, indices_type, **kwargs):
        bias = self.e_score_correction_bias
        if (bias is None or self.use_grouped_topk or self.scoring_func != "softmax"
                or self.custom_routing_function is not None or self.routed_scaling_factor != 1.0):
            return plain(self, hidden_states, router_logits, indices_type, **kwargs)
        scores = torch.softmax(router_logits.float(), dim=-1)
        ids = torch.topk(scores + bias, self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids.to(torch.int32)

    CPURouter._compute_routing = compute_routing


def moe_block_inputs(hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of 6 tokens and their modality (True: image/video token) for one ERNIE-4.5-VL MoE block."""
    x = torch.randn(6, hidden, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([False, True, True, False, True, False])


def _ernie_vl_moe_block(vllm_config, layer: int, hidden: int):
    """What vLLM's ERNIE-4.5-VL MoE block `layer` makes of `moe_block_inputs` (text and vision experts);
    text-only prompts never reach the vision experts."""
    def run(model):
        from vllm.config import set_current_vllm_config
        from vllm.forward_context import set_forward_context

        x, visual = moe_block_inputs(hidden)
        with torch.no_grad(), set_current_vllm_config(vllm_config), set_forward_context(None, vllm_config):
            return model.language_model.model.layers[layer].mlp(x, visual[:, None]).tolist()
    return run


def _run_vllm(model_dir, prompts: list[list[int]], max_tokens: int, moe_block: tuple[int, int] | None = None,
              **engine_args) -> list[dict]:
    from vllm import LLM, SamplingParams

    _fix_ernie_vl_cpu_rope()
    _fix_cpu_router_bias()

    args = dict(skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=64, max_num_seqs=4,
                kv_cache_memory_bytes=32 << 20, seed=0)
    args.update(engine_args)
    llm = LLM(model=str(model_dir), **args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, ignore_eos=True),
                        use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append({"tokens": list(c.token_ids),
                    "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
    if moe_block is not None:
        res.append({"moe_block": llm.apply_model(_ernie_vl_moe_block(llm.llm_engine.vllm_config, *moe_block))[0]})
    return res


@torch.no_grad()
def ccq_greedy(model_dir, prompt: list[int], max_tokens: int) -> dict:
    """The same greedy continuation from `ccq.load` (float32), with the log-softmax of each chosen token."""
    import ccq

    model = ccq.load(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    for _ in range(max_tokens):
        logits = model(input_ids=ids).logits[0, -1].float()
        t = int(logits.argmax())
        tokens.append(t)
        logprobs.append(float(torch.log_softmax(logits, -1)[t]))
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return {"tokens": tokens, "logprobs": logprobs}


if __name__ == "__main__":
    print(json.dumps(_run_vllm(**json.loads(sys.argv[1]))))
