#!/usr/bin/env python3
"""The PyTorch peer of `qlora bench train`: the same LoRA step in transformers + peft, timed side by side.

A Llama-shaped model with random bf16 frozen weights (no download), LoRA on the same projections with the same rank and
alpha, the same sequence length and batch, gradient checkpointing on, AdamW over the adapters. Prints progress on
stderr and one JSON line on stdout: tokens/s over the median step. PyTorch pays no dequantization, so
`tokens/s ours / tokens/s peer` >= 0.9 is the target scripts/gpu-check.sh checks.

Usage: lora_step.py [--layers 16] [--hidden 4096] [--intermediate 14336] [--heads 32] [--kv-heads 8] [--vocab 128256]
                    [--seq 2048] [--batch 1] [--rank 16] [--alpha 32] [--steps 3] [--device cuda] [--no-checkpointing]
"""
import argparse
import json
import statistics
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-checkpointing", action="store_true")
    a = p.parse_args()

    try:
        import torch
        import transformers
        import peft
        from transformers import LlamaConfig, LlamaForCausalLM
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        print(json.dumps({"peer": "pytorch", "status": "skip", "reason": f"cannot import {e.name}: install torch, transformers and peft"}))
        return 3
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"peer": "pytorch", "status": "skip", "reason": "torch.cuda.is_available() is False"}))
        return 3

    device = torch.device(a.device)
    config = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                         num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                         max_position_embeddings=max(2048, a.seq), rms_norm_eps=1e-5, rope_theta=500000.0,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with device:
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(previous)
    model.requires_grad_(False)
    if not a.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)  # adapters in fp32 (peft's autocast_adapter_dtype), frozen weights bf16
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    print(f"peer: {a.layers} layers built in {time.perf_counter() - t0:.1f} s on {device}; "
          f"{sum(q.numel() for q in trainable)} LoRA parameters", file=sys.stderr)

    generator = torch.Generator(device="cpu").manual_seed(5)
    times = []
    for step in range(a.steps + 1):  # step 0 warms up (cuBLAS, allocator)
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        print(f"peer: step {step}: {elapsed:.3f} s, loss {loss.item():.4f}", file=sys.stderr)
        if step > 0:
            times.append(elapsed)

    step_s = statistics.median(times)
    result = {
        "peer": "pytorch", "status": "ok", "layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate,
        "heads": a.heads, "kv_heads": a.kv_heads, "vocab": a.vocab, "seq": a.seq, "batch": a.batch, "rank": a.rank,
        "checkpointing": not a.no_checkpointing, "steps": a.steps, "step_s": round(step_s, 4), "step_times_s": [round(t, 4) for t in times],
        "tokens_per_s": round(a.batch * a.seq / step_s, 1), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
