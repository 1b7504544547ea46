#!/usr/bin/env python3
"""The same shapes as `ril bench model`, in PyTorch eager (transformers' LLaVA), for ratios.

    ril bench model --device cuda:0 --json ril.json [--configs tools/gpu-check/llava-0.5b.json]
    python3 tools/torch-bench.py ril.json --device cuda --out torch.json   # prints the ratio table

It reads what `ril bench model --json` wrote: every model's exact config (the config.json ril
built it from: the preset or `--configs` file with the built-in tokenizer's vocabulary), the
prompt's length and image tokens, the image size, the new tokens, the batch sizes, the training
batch and steps. It builds `LlavaForConditionalGeneration` from that config with random weights
(float32, as ril's bench), and times on the same device:

- generation: `generate` with the KV cache (and without it up to ril's recompute batch),
  exactly `new_tokens` new tokens per sequence (min = max, no EOS), sampling with the paper's
  settings (temperature 1, top-p 0.95, top-k 50, repetition penalty 1.05);
- training: forward + backward + AdamW on `train_batch` sequences of the same length as ril's
  (prompt with the image + answer), loss over every position (the cost does not depend on the
  mask), one warm-up step, then `train_steps` timed steps.

Tokens per second count new tokens (generation) and tokens per step (training), as ril does.
The ratio printed is ril / PyTorch: above 1 means ril is faster. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(torch, transformers, config: dict, device: str):
    cfg = transformers.LlavaConfig.from_dict(dict(config))
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg)
    return model.to(device=device, dtype=torch.float32), cfg


def inputs_for(torch, model_entry: dict, batch: int, extra_tokens: int, device: str):
    """`batch` sequences shaped as ril's: the image tokens, then text, `extra_tokens` more."""
    cfg = model_entry["config"]
    vocab = cfg["text_config"]["vocab_size"]
    image_token = cfg["image_token_index"]
    n_image = model_entry["image_tokens_per_prompt"]
    length = model_entry["prompt_tokens"] + extra_tokens
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, vocab, (batch, length), generator=g)
    # Text tokens must not collide with the image token (LLaVA counts them).
    text = torch.where(text == image_token, (text + 1) % vocab, text)
    text[:, 1 : 1 + n_image] = image_token
    side = cfg["vision_config"]["image_size"]
    n_images = model_entry["images_per_prompt"]
    pixels = torch.randn(batch * n_images, 3, side, side, generator=g)
    ids = text.to(device)
    return ids, torch.ones_like(ids), pixels.to(device)


def time_generation(torch, model, entry, batch, new_tokens, use_cache, device):
    ids, mask, pixels = inputs_for(torch, entry, batch, 0, device)
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        temperature=1.0,
        top_p=0.95,
        top_k=50,
        repetition_penalty=1.05,
        use_cache=use_cache,
        pad_token_id=0,
        eos_token_id=None,
    )
    with torch.no_grad():
        model.generate(**{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        sync(torch, device)
        started = time.perf_counter()
        out = model.generate(**kwargs)
        sync(torch, device)
    seconds = time.perf_counter() - started
    produced = (out.shape[1] - ids.shape[1]) * batch
    if produced != new_tokens * batch:
        raise RuntimeError(f"generate made {produced} tokens, expected {new_tokens * batch}")
    return seconds, produced / seconds


def time_training(torch, model, entry, batch, tokens_per_step, steps, device):
    per_seq = tokens_per_step // batch
    answer = per_seq - entry["prompt_tokens"]
    ids, mask, pixels = inputs_for(torch, entry, batch, max(answer, 1), device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    sync(torch, device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(torch, device)
    per_step = (time.perf_counter() - started) / max(steps, 1)
    model.eval()
    return per_step, ids.numel() / per_step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ril_json", help="what `ril bench model --json` wrote")
    ap.add_argument("--device", default="cuda", help="torch device (cuda, cuda:0, cpu)")
    ap.add_argument("--out", help="write the PyTorch figures and ratios here as JSON")
    args = ap.parse_args()
    try:
        import torch
        import transformers
    except Exception as e:  # the GPU machine may have no torch: say so, do not pretend
        print(f"torch-bench: PyTorch/transformers not importable here ({e}); no ratios", file=sys.stderr)
        return 3
    with open(args.ril_json) as f:
        ril = json.load(f)
    if "models" not in ril:
        print(f"torch-bench: {args.ril_json} has no `models` (written by an older ril?)", file=sys.stderr)
        return 2
    run = ril["run"]
    rows = []
    for entry in ril["models"]:
        name = entry["size"]
        model, _ = build_model(torch, transformers, entry["config"], args.device)
        params = sum(p.numel() for p in model.parameters())
        model.eval()
        for fig in (f for f in ril["generation"] if f["size"] == name):
            use_cache = fig["mode"] == "kv-cache"
            secs, tps = time_generation(
                torch, model, entry, fig["batch"], fig["new_tokens"], use_cache, args.device
            )
            rows.append(dict(kind="generation", size=name, parameters=params, batch=fig["batch"],
                             mode=fig["mode"], torch_seconds=secs, torch_tokens_per_second=tps,
                             ril_tokens_per_second=fig["tokens_per_second"],
                             ratio=fig["tokens_per_second"] / tps))
        for fig in (f for f in ril["training"] if f["size"] == name):
            secs, tps = time_training(torch, model, entry, fig["batch"], fig["tokens_per_step"],
                                      run["train_steps"], args.device)
            rows.append(dict(kind="training", size=name, parameters=params, batch=fig["batch"],
                             mode="fwd+bwd+AdamW", torch_seconds=secs, torch_tokens_per_second=tps,
                             ril_tokens_per_second=fig["tokens_per_second"],
                             ratio=fig["tokens_per_second"] / tps))
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}")
    print("| kind | size | parameters | batch | mode | ril tokens/s | PyTorch tokens/s | ril / PyTorch |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['size']} | {r['parameters'] / 1e6:.1f}M | {r['batch']} | {r['mode']} "
              f"| {r['ril_tokens_per_second']:.0f} | {r['torch_tokens_per_second']:.0f} | {r['ratio']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(torch=torch.__version__, transformers=transformers.__version__,
                           device=args.device, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
