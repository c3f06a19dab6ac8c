"""Training steps of a RoBERTa-base-shaped model on AG News lengths, three ways; and a T4 stand-in.

    python bench/gpu_steps.py --data DATA/agnews_dev_train.csv --tokenizer MINILM_DIR
    python bench/gpu_steps.py --t4           # fp16, no flash or cuDNN attention, 32 rows x 512
    python bench/gpu_steps.py --tiny ...     # a CPU dry run: 2 layers of width 32, fp32

The model is built from a config (random weights, nothing downloaded): RoBERTa-base's shape, 4
labels, LoRA r=2 on query and value (lora.inject_lora's default targets), the head trained, its
frozen weights in fp32 as train.py keeps them (autocast casts them). Steps go the real way:
data.tokenize (MiniLM's tokenizer stands in for RoBERTa's), batches of 32 from
data.length_grouped_batches, train.micro_batches (padding and the copy to the device),
train.train_step and train.make_optimizer with train.py's defaults (train.parse_args, then
train.start_process: the device and its precision), bf16, each batch one piece (--grad-accum 1).

Variants, in this order, each as train.py runs it: eager (train.py; on a GPU padded to multiples of
8); torch.compile with CUDA graphs (train.py --compile: train.compile_options' reduce-overhead,
dynamic=False, padded to 16); and torch.compile's default mode (dynamic=False, padded to 16: what
train.py --compile --grad-accum N takes, timed here on whole batches so that it compares with the
one before), which may find kernels in the caches the one before it filled (its compile_s is then
lower than a first run's). All time the same batches: the first --steps full batches of an epoch
whose width padded to 16 is one of the --shapes commonest (3 hold 88% of AG News' batches, 4 hold
94%; a whole epoch has 13 widths, each compiled once). First one JSON line on the batches (widths,
coverage, the peak assumed), then one per variant:
  widths     the padded widths of the timed batches, as train.micro_batches made them
  compile_s  wall time of the first --warmup steps of each shape (compiling, capturing graphs)
  step_ms    median wall time of a step, synchronized after each; gpu_ms: the same by CUDA events
  host_ms    median time from padding the batch until train_step returns, not synchronized (the
             Python side of a step: what the GPU waits for when it is the longer)
  loop_ms    the same steps run back to back, synchronized once: the pace of a training run
  kernels, launches, kernel_ms   a step, by torch.profiler over 3: CUDA kernels run, host-side
             launch calls (cudaLaunchKernel, cudaGraphLaunch, ...), GPU busy time
  host_syncs aten::_local_scalar_dense and is_nonzero calls in one step (a TorchDispatchMode;
             eager only: compiled code is not dispatched op by op); cuda_syncs: synchronizing
             CUDA calls in that step (torch.cuda.set_sync_debug_mode)
  mfu        4 N tokens / loop time / peak: N the encoder's parameters (85M), the real tokens
             (not padding), peak 989 TFLOP/s, dense bf16 of an H100 or H200 SXM (A100: 312), by
             the device's name (another GPU: null)
--t4 prints one line: step_ms (median of --steps), peak_gib (torch.cuda.max_memory_allocated)
against the 10 GiB target, and the attention kernels that ran.
On a CPU the CUDA-only fields are null, and torch.compile uses the aot_eager backend (no C++
compiler run: a dry run of the code path, not a measurement).
"""
import argparse
import collections
import gc
import itertools
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from data import Tokens, length_grouped_batches, load_splits, tokenize  # noqa: E402
from lora import inject_lora  # noqa: E402
from predict import pick_device  # noqa: E402

PAD = 1  # RoBERTa's padding id: its position ids count from it (MiniLM's ids never use 1)
# name: (args.compile, the --grad-accum whose torch.compile mode train.compile_options picks);
# every variant steps on whole batches, so that all three compute the same steps
VARIANTS = {"eager": (False, 1),  # train.py
            "cudagraphs": (True, 1),  # train.py --compile: reduce-overhead
            "compile": (True, 2)}  # train.py --compile --grad-accum 2: the default mode
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16, SXM parts
LAUNCHES = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cuGraphLaunch")  # runtime, driver API


def build_model(tiny, device):
    """RoBERTa-base's shape (or 2 layers of width 32), LoRA r=2 on query and value, head trained;
    in fp32, as train.lora_model leaves it."""
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                           pad_token_id=PAD, bos_token_id=0, eos_token_id=2, num_labels=4,
                           **(small if tiny else {}))
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config)
    inject_lora(model, 2, 4.0, 0.05, skip=["classifier"])  # targets: query and value
    model.classifier.requires_grad_(True)
    return model.to(device).train()


def args_for(cli, precision, compile=False, grad_accum=1):
    """train.py's flags with its defaults (train.parse_args), placed by train.start_process (the
    device, its precision); --tiny: on the CPU in fp32 whatever the machine has."""
    argv = ["--batch-size", str(cli.batch_size), "--max-length", str(cli.max_length),
            "--precision", precision, "--grad-accum", str(grad_accum)]
    args = train.parse_args(argv + (["--compile"] if compile else []))
    args.loss_weight = None  # every row alike, as train() sets it without --class-weights
    train.start_process(args)
    if cli.tiny:
        args.device, args.amp_dtype = torch.device("cpu"), None
    return args


def step_model_for(model, args):
    """(what the steps call, torch.compile's options or None), as train.lora_model makes it: the
    model, or torch.compile's wrapper with train.compile_options (on a CPU the aot_eager backend:
    no C++ compiler run)."""
    if not args.compile:
        return model, None
    options = train.compile_options(args)  # its cache limit too: one graph per padded width
    if args.device.type != "cuda":
        options = {"backend": "aot_eager", "dynamic": False}
    return torch.compile(model, **options), options


class CountSyncs(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (a GPU sync each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero")
        return func(*args, **(kwargs or {}))


def profiled(step, rows_list, cuda):
    """(kernels, launches, kernel_ms) a step over rows_list, by torch.profiler (None on a CPU)."""
    if not cuda:
        return None, None, None
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for rows in rows_list:
            step(rows)
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    launches = sum(e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(LAUNCHES)
                   for e in events)
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1000
    n = len(rows_list)
    return round(len(kernels) / n, 1), round(launches / n, 1), round(busy / n, 2)


def count_syncs(step, rows, cuda, eager):
    """(host_syncs, cuda_syncs) in one step."""
    host = None
    if eager:
        with CountSyncs() as counter:
            step(rows)
        host = counter.count
    if not cuda:
        return host, None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(rows)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return host, sum("synchroniz" in str(w.message) for w in caught)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_of(device):
    """(peak FLOP/s, what was assumed) for this device's name, or (None, why not)."""
    name = device_name(device)
    for key, flops in PEAKS.items():
        if key in name:
            return flops, f"{key} SXM dense bf16 {flops / 1e12:.0f} TFLOP/s"
    return None, f"no peak known for {name}"


def time_variant(name, cli, tokens, labels, chosen):
    """One JSON line: the variant's steps over `chosen`, warmed up per shape, then timed."""
    compile, mode_of_accum = VARIANTS[name]
    args = args_for(cli, cli.precision, compile, mode_of_accum)
    device, cuda = args.device, args.device.type == "cuda"
    torch._dynamo.reset()  # the last variant's graphs (and the model they hold) go
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    model = build_model(cli.tiny, device)
    step_model, compile_options = step_model_for(model, args)
    args.grad_accum = 1  # whole batches, for every variant alike (the mode is chosen above)
    optimizer, scheduler, scaler = train.make_optimizer(model, args, total_steps=10**6)

    def width(rows):  # as micro_batches pads the batch for this variant
        return next(train.micro_batches(tokens, labels, rows, PAD, args))[0].shape[1]

    def step(rows):
        pieces = train.micro_batches(tokens, labels, rows, PAD, args)
        return train.train_step(step_model, pieces, optimizer, scheduler, scaler, args)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    widths = [width(rows) for rows in chosen]
    first = {}  # padded width -> the first batch of it
    for rows, w in zip(chosen, widths):
        first.setdefault(w, rows)
    start = time.perf_counter()
    for rows in first.values():
        for _ in range(cli.warmup):
            step(rows)
    sync()
    compile_s = time.perf_counter() - start

    walls, hosts, gpus = [], [], []
    for rows in chosen:
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        t0 = time.perf_counter()
        step(rows)
        t1 = time.perf_counter()
        if cuda:
            end.record()
        sync()
        walls.append(time.perf_counter() - t0)
        hosts.append(t1 - t0)
        if cuda:
            gpus.append(begin.elapsed_time(end) / 1000)
    start, loss = time.perf_counter(), torch.zeros((), device=device)
    for rows in chosen:
        loss += step(rows)
    sync()
    loop_s = (time.perf_counter() - start) / len(chosen)
    kernels, launches, kernel_ms = profiled(step, chosen[:3], cuda)
    host_syncs, cuda_syncs = count_syncs(step, chosen[0], cuda, compile_options is None)

    tokens_a_step = float(np.mean([tokens.lengths[rows].sum() for rows in chosen]))
    padded = cli.batch_size * sum(widths)
    encoder = sum(p.numel() for p in model.roberta.encoder.parameters())
    peak, _ = peak_of(device)
    ms = lambda seconds: round(1000 * seconds, 2)  # noqa: E731
    return {"section": "steps", "variant": name, "device": device_name(device),
            "precision": cli.precision, "widths": sorted(first), "compile": compile_options,
            "backend": compile_options and compile_options.get("backend", "inductor"),
            "steps": len(chosen), "shapes": len(first), "compile_s": round(compile_s, 2),
            "step_ms": ms(statistics.median(walls)), "host_ms": ms(statistics.median(hosts)),
            "gpu_ms": ms(statistics.median(gpus)) if gpus else None, "loop_ms": ms(loop_s),
            "kernel_ms": kernel_ms, "kernels": kernels, "launches": launches,
            "host_syncs": host_syncs, "cuda_syncs": cuda_syncs,
            "tokens_a_step": round(tokens_a_step, 1),
            "padded_share": round(1 - tokens_a_step * len(chosen) / padded, 4),
            "mfu": round(4 * encoder * tokens_a_step / loop_s / peak, 4) if peak and cuda else None,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "loss_finite": bool(torch.isfinite(loss).item())}


def steps_section(cli, device):
    """The three variants (or --variants) on the same batches; one JSON line each."""
    tokenizer = AutoTokenizer.from_pretrained(cli.tokenizer)
    flags = argparse.Namespace(data=cli.data, val_size=640, seed=42, limit=cli.limit,
                               label_names=None, num_labels=None, val_data=None)
    (texts, labels), _, _ = load_splits(flags)
    tokens, labels = tokenize(tokenizer, texts, cli.max_length), torch.tensor(labels)
    batches = [b for b in length_grouped_batches(tokens.lengths, cli.batch_size, 42)
               if len(b) == cli.batch_size]
    width = lambda rows: -(-int(tokens.lengths[rows].max()) // 16) * 16  # noqa: E731
    counts = collections.Counter(map(width, batches))
    common = {w for w, _ in counts.most_common(cli.shapes)}
    kept = [b for b in batches if width(b) in common]
    chosen = list(itertools.islice(itertools.cycle(kept), cli.steps))
    peak, assumed = peak_of(device)
    print(json.dumps({"section": "batches", "device": device_name(device), "rows": len(tokens),
                      "epoch_batches": len(batches), "epoch_widths_pad16": len(counts),
                      "epoch_widths_pad1": len({int(tokens.lengths[b].max()) for b in batches}),
                      "widths_timed": sorted(common),
                      "coverage": round(len(kept) / len(batches), 3), "peak": assumed}),
          flush=True)
    for name in cli.variants:
        try:
            line = time_variant(name, cli, tokens, labels, chosen)
        except Exception as e:  # one variant failing leaves the others' lines
            line = {"section": "steps", "variant": name, "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(line), flush=True)


def t4_section(cli, device):
    """fp16 with the gradient scaler, flash and cuDNN attention off, every row 512 long."""
    cuda = device.type == "cuda"
    if cuda:  # a T4 (sm75) has neither flash nor cuDNN attention: memory-efficient SDPA runs
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    precision = "fp16" if cuda else "fp32"
    args = args_for(cli, precision)
    model = build_model(cli.tiny, device)
    optimizer, scheduler, scaler = train.make_optimizer(model, args, total_steps=10**6)
    n, length = cli.batch_size, cli.max_length
    ids = torch.randint(3, 30000, (n * length,), generator=torch.Generator().manual_seed(0))
    tokens = Tokens(ids.numpy().astype(np.int32), np.arange(0, n * length + 1, length))
    labels, rows = torch.randint(0, 4, (n,)), list(range(n))

    def step():
        pieces = train.micro_batches(tokens, labels, rows, PAD, args)
        return train.train_step(model, pieces, optimizer, scheduler, scaler, args)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(cli.warmup):
        step()
    walls = []
    for _ in range(cli.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        walls.append(time.perf_counter() - t0)
    attention = None
    if cuda:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        names = {e.name for e in prof.events()}
        keys = ("fmha", "flash", "attention", "sdpa")
        attention = sorted(n[:80] for n in names if any(k in n.lower() for k in keys))[:3]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    print(json.dumps({"section": "t4", "device": device_name(device), "precision": precision,
                      "flash_sdp": torch.backends.cuda.flash_sdp_enabled() if cuda else None,
                      "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled() if cuda else None,
                      "attn_implementation": model.config._attn_implementation,
                      "attention_kernels": attention, "batch": n, "length": length,
                      "steps": cli.steps, "step_ms": round(1000 * statistics.median(walls), 2),
                      "peak_gib": round(peak, 2) if cuda else None, "target_gib": 10,
                      "fits": peak <= 10 if cuda else None,
                      "loss": round(loss.item(), 4)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a text,label CSV (AG News): its lengths make the batches")
    p.add_argument("--tokenizer", help="a tokenizer folder (MiniLM's will do)")
    p.add_argument("--t4", action="store_true", help="the T4 stand-in instead of the variants")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="timed steps (200; --t4: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each shape first")
    p.add_argument("--shapes", type=int, default=3, help="the commonest widths (padded to 16)")
    p.add_argument("--limit", type=int, default=None, help="use only this many rows")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--tiny", action="store_true", help="a 2-layer width-32 model, fp32 on a CPU")
    cli = p.parse_args()
    device = torch.device("cpu") if cli.tiny else pick_device()
    if cli.tiny:
        cli.precision = "fp32"
    cli.steps = cli.steps or (10 if cli.t4 else 200)
    if cli.t4:
        return t4_section(cli, device)
    if not (cli.data and cli.tokenizer):
        p.error("give --data (a text,label CSV: DATA/agnews_dev_train.csv) and --tokenizer DIR")
    steps_section(cli, device)


if __name__ == "__main__":
    main()
