"""The language model's step alone: Qwen2.5-VL-7B's LLM forward + backward at one sample's length.

The ceiling `bench/step.py` is compared against (docs/performance.md): no DeepSpeed, no encoders,
no optimizer; random bf16 weights built on the GPU, sdpa attention, loss on the answer positions
only (or, for comparison, on full-vocabulary logits). One row per variant:

    python3 bench/llm_probe.py            # one GPU; JSON to $OUT or bench/results/
    python3 bench/llm_probe.py --tiny     # CPU, tiny config (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (bench/common.py)

TOKENS = 3777  # 9 images x 391 + text, the official geometry
ANSWER = 24  # labelled positions
VARIANTS = (  # name, gradient checkpointing, loss on answer positions only, micro batch
    ("ckpt_off_restricted_mb1", False, True, 1),
    ("ckpt_on_restricted_mb1", True, True, 1),
    ("ckpt_off_fulllogits_mb1", False, False, 1),
    ("ckpt_off_restricted_mb2", False, True, 2),
    ("ckpt_on_restricted_mb4", True, True, 4),
)


def build(tiny: bool, device: str):
    import torch
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    from janus_job.models.flavors import QWEN25_VL_7B_TEXT

    fields = dict(QWEN25_VL_7B_TEXT)
    if tiny:
        fields.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512,
                      rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
    config = Qwen2_5_VLTextConfig(**fields)
    config._attn_implementation = "sdpa"
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLTextModel(config).to(dtype)
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
    return model, head, config, dtype


def forward_loss(model, head, x, positions, labels, restricted: bool = True):
    """The probe's forward: the language model on `x` (micro, tokens, hidden), the LM head and
    cross-entropy on the last `labels.shape[1]` positions before the end (the answer)."""
    import torch

    tokens, answer = x.shape[1], labels.shape[1]
    hidden = model(inputs_embeds=x, position_ids=positions).last_hidden_state
    span = slice(tokens - answer - 1, tokens - 1)
    logits = head(hidden[:, span]).float() if restricted else head(hidden).float()[:, span]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def inputs(config, dtype, device, micro: int, tokens: int, answer: int = ANSWER):
    """Random embeddings, text positions (the probe has no images) and answer labels."""
    import torch

    x = torch.randn(micro, tokens, config.hidden_size, device=device, dtype=dtype) * 0.02
    positions = torch.arange(tokens, device=device).view(1, 1, tokens).expand(3, micro, tokens)
    labels = torch.randint(0, config.vocab_size, (micro, answer), device=device)
    return x, positions, labels


def measure(model, head, config, dtype, device, ckpt: bool, restricted: bool, micro: int,
            tokens: int, iters: int) -> dict:
    import torch

    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    x, positions, labels = inputs(config, dtype, device, micro, tokens)
    params = list(model.parameters()) + [head.weight]
    times = []
    try:
        for _ in range(iters + 2):  # two warm-ups
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward_loss(model, head, x, positions, labels, restricted).backward()
            for p in params:
                p.grad = None
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"oom": True}
    seconds = sum(times[2:]) / iters
    n_params = sum(p.numel() for p in params)
    return {
        "s_per_step": seconds,
        "samples_per_s": micro / seconds,
        "mfu_790": 6 * n_params * tokens * micro / seconds / common.H100_MEASURED_MATMUL_FLOPS if cuda else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny config")
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--out", help="output folder (default $OUT, else bench/results)")
    args = parser.parse_args()
    import torch

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    model, head, config, dtype = build(args.tiny, device)
    tokens = 64 if args.tiny else TOKENS
    result = {"card": common.card_name(), "tokens": tokens, "params": sum(p.numel() for p in model.parameters())
              + head.weight.numel(), "tiny": args.tiny}
    print(f"llm_probe on {result['card']}: {tokens} tokens, {result['params'] / 1e9:.2f}B parameters")
    for name, ckpt, restricted, micro in VARIANTS:
        result[name] = measure(model, head, config, dtype, device, ckpt, restricted, micro, tokens, args.iters)
        print(f"  {name:26s} {json.dumps(result[name])}")
    path = common.results_path(result["card"], 1, args.out, prefix="tiny-" if args.tiny else "", tag="llm_probe")
    common.write_json_atomic(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
