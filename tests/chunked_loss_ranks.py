"""2-rank worker for tests/test_chunked_loss.py (started by torchrun, gloo): the chunked loss against the plain one
under DDP and under DeepSpeed ZeRO-3 — losses, log-probabilities, entropies and (all-reduced / gathered) gradients.

Each rank gets a different batch, counting a different number of tokens, so with a small chunk the ranks run
different numbers of chunks: under ZeRO-3 each head call gathers the partitioned weight (a collective), which
the chunked loss must keep in step across ranks. Under DDP one rank counts no token at all (its head still
gets a zero gradient, or DDP would wait for it forever). Writes {case: {quantity: max abs difference}} as JSON
from rank 0 to the path given as argv[1].

DDP wraps as accelerate's prepare does (torch DistributedDataParallel, no extra options); ZeRO-3 through
deepspeed.initialize with the settings of launch/ds_zero3.json (accelerate hands DeepSpeed the same engine
arguments; one process here prepares several models, which one Accelerator cannot).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

CHUNK = 7  # small: several chunks per batch, a different number on each rank


def tiny_model(tied: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def lora(model, on_head: bool = False):
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj"] + (["lm_head"] if on_head else [])))
    for name, p in model.named_parameters():  # a non-zero adapter, so its gradients are not trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(3))
    return model


def sft_batch(rank: int, packed: bool, nothing_counted: bool = False) -> dict:
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, 300, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, : 4 + 8 * (1 - rank)] = -100  # rank 0 counts fewer tokens than rank 1
    if nothing_counted:
        labels[:] = -100
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = torch.tensor([list(range(10)) + list(range(14))] * 2)
    else:
        batch["attention_mask"] = torch.ones_like(ids)
        batch["attention_mask"][1, 18:] = 0
        batch["labels"][1, 18:] = -100
    return batch


def ppo_batch(rank: int) -> dict:
    g = torch.Generator().manual_seed(20 + rank)
    seq = torch.randint(0, 300, (3, 18 + 4 * rank), generator=g)  # ranks differ in response length
    mask = torch.ones_like(seq)
    mask[0, :2] = 0
    return {"sequences": seq, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "prompt_length": 6, "advantages": torch.randn(3, seq.shape[1] - 6, generator=g)}


def sft_objective(batch):
    from ftl.evaluate.lm import causal_lm_loss

    def run(model, chunk):
        loss, _ = causal_lm_loss(model, batch, chunk)
        return loss, {"loss": loss.detach()}
    return run


def ppo_objective(b):
    from ftl.rl.rollout import response_logprobs

    def run(model, chunk):
        logprobs, entropy = response_logprobs(model, b["sequences"], b["attention_mask"], b["position_ids"],
                                              b["prompt_length"], 0.7, with_entropy=True, chunk_tokens=chunk)
        return (logprobs * b["advantages"]).mean(), {"logprobs": logprobs.detach(), "entropy": entropy.detach()}
    return run


def ddp_grads(wrapped, names):
    return {n: p.grad.detach().clone() for n, p in zip(names, wrapped.module.parameters()) if p.grad is not None}


def zero3_grads(engine, names):
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for n, p in zip(names, engine.module.parameters()):
        if p.requires_grad:
            g = safe_get_full_grad(p)  # a collective: every rank asks for every parameter
            grads[n] = g.detach().clone()
    return grads


def both_ways(wrapped, objective, backward, grads_of, zero_grad, names) -> dict:
    """Max abs differences (plain vs chunked) of the objective's outputs and of every gradient."""
    results = []
    for chunk in (0, CHUNK):
        zero_grad()
        loss, outputs = objective(wrapped, chunk)
        backward(loss)
        results.append((outputs, grads_of(wrapped, names)))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads, (plain_grads.keys(), chunked_grads.keys())
    diffs = {k: (plain[k] - chunked[k]).abs().max().item() for k in plain}
    diffs["grad"] = max((plain_grads[k] - chunked_grads[k]).abs().max().item() for k in plain_grads)
    diffs["grad_scale"] = max(g.abs().max().item() for g in plain_grads.values())
    diffs["params_with_grad"] = len(plain_grads)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in diffs.items()}


def ddp_case(model, objective) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, _ in model.named_parameters()]
    wrapped = DistributedDataParallel(model)
    return both_ways(wrapped, objective, lambda loss: loss.backward(), ddp_grads,
                     lambda: model.zero_grad(set_to_none=True), names)


def zero3_case(model, objective) -> dict:
    import deepspeed

    names = [n for n, _ in model.named_parameters()]
    hidden = model.config.hidden_size
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
              "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                    "reduce_bucket_size": hidden * hidden,
                                    "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                                    "stage3_param_persistence_threshold": 10 * hidden,
                                    "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9},
              "data_types": {"grad_accum_dtype": "fp32"}}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    head = engine.module.get_output_embeddings() if hasattr(engine.module, "get_output_embeddings") \
        else engine.module.get_base_model().get_output_embeddings()
    assert any(p.ds_numel > p.ds_tensor.numel() for p in head.parameters()), "lm_head not partitioned"
    return both_ways(engine, objective, engine.backward, zero3_grads, lambda: engine.optimizer.zero_grad(), names)


def zero3_eval_case(model, rank: int) -> dict:
    """No-grad evaluation loss (what lm_loss computes) under ZeRO-3 with uneven chunk counts."""
    import deepspeed

    from ftl.evaluate.lm import token_losses

    hidden = model.config.hidden_size
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * hidden}}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    engine.eval()
    batch = sft_batch(rank, packed=False)
    with torch.no_grad():
        plain, mask = token_losses(engine, batch, 0)
        chunked, _ = token_losses(engine, batch, CHUNK)
    return {"losses": torch.tensor((plain - chunked)[mask].abs().max().item(), dtype=torch.float64)}


def main(out_path: str) -> None:
    from ftl.train.distributed import use_deepspeed_cpu_accelerator

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    use_deepspeed_cpu_accelerator()
    cases = {
        "ddp full untied unpacked": lambda: ddp_case(tiny_model(False), sft_objective(sft_batch(rank, False))),
        "ddp full tied packed, rank 0 counts nothing": lambda: ddp_case(
            tiny_model(True), sft_objective(sft_batch(rank, True, nothing_counted=rank == 0))),
        "ddp lora (lm_head too) tied unpacked": lambda: ddp_case(lora(tiny_model(True), on_head=True),
                                                                 sft_objective(sft_batch(rank, False))),
        "ddp ppo logprobs+entropy": lambda: ddp_case(tiny_model(False), ppo_objective(ppo_batch(rank))),
        "zero3 full untied unpacked": lambda: zero3_case(tiny_model(False), sft_objective(sft_batch(rank, False))),
        "zero3 full tied packed": lambda: zero3_case(tiny_model(True), sft_objective(sft_batch(rank, True))),
        "zero3 lora untied packed": lambda: zero3_case(lora(tiny_model(False)), sft_objective(sft_batch(rank, True))),
        "zero3 ppo logprobs+entropy tied": lambda: zero3_case(tiny_model(True), ppo_objective(ppo_batch(rank))),
        "zero3 eval no-grad": lambda: zero3_eval_case(tiny_model(True), rank),
    }
    report = {}
    for name, case in cases.items():
        diffs = case()
        for key, value in diffs.items():  # the worst over both ranks
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        report[name] = {k: v.item() for k, v in diffs.items()}
    report["world_size"] = world
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # DeepSpeed's occasional SIGABRT at interpreter exit (FACTS.md)


if __name__ == "__main__":
    main(sys.argv[1])
