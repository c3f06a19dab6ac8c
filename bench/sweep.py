"""Where the budget should go: a screen of targets, ranks, inits and rates; the best on all rows.

    python bench/sweep.py screen --model M --data TRAIN.csv --eval EVAL.csv --out sweep [--jobs 4]
    python bench/sweep.py full --model M --data TRAIN.csv --eval EVAL.csv --out sweep [--top 3]
    python bench/sweep.py report --out sweep
    (anything after -- goes to every train.py run, e.g. -- --val-size 100 for a dry run)

Each configuration is one train.py run of --epochs 3 at a constant rate that evaluates every
epoch; epochs 1, 2 and 3 are read from it by training one epoch at a time with --resume (which
continues exactly) and scoring the restored best adapter on the eval file after each. The
screen (one seed, --limit 4000) compares targets at equal adapter counts (RoBERTa-base's r=2
query+value LoRA, 73,728, and what its 1M budget leaves after the head, 406,332: --r auto fits
the rank), LoRA and PiSSA init, and rates; LoRA+ (B's rate 16 times A's) and rsLoRA (scale
alpha / sqrt(r)) are tried by patching train.py here, not in the product. `full` runs the screen's
best three and today's defaults on all rows with two seeds; `report` prints both tables and a
paired bootstrap of each against the defaults over the eval rows. Every run's predictions are kept.
"""
import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
HEAD = 1_540  # MiniLM's new head: 384 x 4 + 4 (for another model, pass --head)
TARGETS = {"qv": ["query", "value"], "attn": ["query", "key", "value", "attention.output.dense"],
           "all": ["all-linear"]}


def screen_configs(head):
    """name -> flags: today's defaults, then 2 budgets x 3 target sets x (LoRA at 2 rates, PiSSA
    at 3), then tricks."""
    configs = {"default_qv_r2_lora_1e-3": ["--r", "2", "--lr", "1e-3"]}
    for budget in (73_728, 406_332):
        for where, targets in TARGETS.items():
            for init, rates in (("lora", ("1e-3", "2e-3")), ("pissa", ("5e-4", "1e-3", "2e-3"))):
                for lr in rates:
                    configs[f"{where}_{budget}_{init}_{lr}"] = [
                        "--targets", *targets, "--r", "auto", "--max-trainable",
                        str(budget + head), "--init", init, "--lr", lr]
    for trick in ("loraplus", "rslora"):
        for base in ("qv_73728_lora_1e-3", "all_406332_lora_1e-3"):
            configs[f"{base}+{trick}"] = configs[base] + [f"--trick={trick}"]
    return configs


def run_config(name, flags, args, seed, limit):
    """Train epoch by epoch (--resume), score the eval file after each; one JSON line per epoch.
    The run's predictions go in runs/NAME_seedS, train.py's folder in runs/NAME_seedS/train (a
    run's --out holds only its own files: train.py refuses one with others in it)."""
    out = os.path.join(args.out, "runs", f"{name}_seed{seed}" + ("" if limit else "_all"))
    trick = [f for f in flags if f.startswith("--trick=")]
    flags = [f for f in flags if not f.startswith("--trick=")]
    command = [sys.executable, __file__, "one", "--out-dir", out, "--eval", args.eval, *trick, "--",
               "--model", args.model, "--data", args.data, "--out", os.path.join(out, "train"),
               "--seed", str(seed), "--max-length", str(args.max_length), "--eval-every", "0",
               *(["--limit", str(limit)] if limit else []), *flags, *args.train_flags]
    threads = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=threads)
    if result.returncode != 0:
        return [{"name": name, "seed": seed, "error": result.stderr[-2000:]}]
    return [dict(json.loads(line), name=name, seed=seed, rows="4000" if limit else "all")
            for line in result.stdout.splitlines() if line.startswith("{")]


def one(argv):
    """In a fresh process: apply the trick (if any), then train and score epoch by epoch."""
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir")
    p.add_argument("--eval")
    p.add_argument("--trick", default=None)
    p.add_argument("--epochs", type=int, default=3)
    own, train_argv = p.parse_known_args(argv)
    train_argv = [a for a in train_argv if a != "--"]
    import torch
    from transformers import AutoTokenizer
    import data
    import predict
    import train
    apply_trick(own.trick, train)
    texts, labels = data.read_texts(own.eval)
    os.makedirs(own.out_dir, exist_ok=True)
    start = time.perf_counter()
    for epoch in range(1, own.epochs + 1):
        resume = ["--resume"] if epoch > 1 else []
        args = train.parse_args(train_argv + ["--epochs", str(epoch)] + resume)
        train.start_process(args)  # the device and its precision, as train.py's main places them
        model, val_acc = train.train(args)
        tokenizer = AutoTokenizer.from_pretrained(args.model)  # load_base_model's
        tokens = data.tokenize(tokenizer, texts, args.max_length)
        predicted = predict.predict_logits(model, tokens, tokenizer.pad_token_id, 64, args.device,
                                           args.amp_dtype).argmax(-1)
        with open(os.path.join(own.out_dir, f"eval_predictions_epoch{epoch}.json"), "w") as f:
            json.dump(predicted.tolist(), f)
        accuracy = (predicted == torch.tensor(labels)).float().mean().item()
        config = json.load(open(os.path.join(args.out, "config.json")))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        alpha = config["alpha"] / (2 if config["init"] == "pissa" else 1)
        print(json.dumps({"epoch": epoch, "val_accuracy": val_acc, "eval_accuracy": accuracy,
                          "r": config["trained_r"], "alpha": alpha, "trainable": trainable,
                          "wall_s": round(time.perf_counter() - start, 1)}), flush=True)


def apply_trick(trick, train):
    """LoRA+ or rsLoRA, patched in for the screen only (each becomes a flag only if it wins)."""
    import lora
    if trick == "loraplus":  # B's learning rate 16 times A's (Hayou et al., 2024)
        real = train.make_optimizer

        def make_optimizer(model, args, total_steps):
            optimizer, scheduler, scaler = real(model, args, total_steps)
            b = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n]
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if all(p is not q for q in b)]
            optimizer.add_param_group({"params": b, "lr": 16 * args.lr,
                                       "weight_decay": args.weight_decay,
                                       "initial_lr": 16 * args.lr})
            scheduler.base_lrs.append(16 * args.lr)
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
            return optimizer, scheduler, scaler
        train.make_optimizer = make_optimizer
    elif trick == "rslora":  # scale alpha / sqrt(r) instead of alpha / r (Kalajdzievski, 2023)
        real_init = lora.LoRALinear.__init__

        def __init__(self, base, r, alpha, *rest, **options):  # PiSSALinear's too
            # alpha sqrt(r) / r = alpha / sqrt(r)
            real_init(self, base, r, alpha * math.sqrt(r), *rest, **options)
        lora.LoRALinear.__init__ = __init__


def paired_bootstrap(correct_a, correct_b, rounds=2000, seed=0):
    """95% interval of mean accuracy(a) - mean accuracy(b), resampling eval rows (paired: the
    same rows for both)."""
    import torch
    # (runs, rows)
    a, b = (torch.tensor(c, dtype=torch.float) for c in (correct_a, correct_b))
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(a.shape[-1], (rounds, a.shape[-1]), generator=generator)
    diffs = a[:, rows].mean(dim=(0, 2)) - b[:, rows].mean(dim=(0, 2))
    low, high = torch.quantile(diffs, 0.025).item(), torch.quantile(diffs, 0.975).item()
    return (a.mean() - b.mean()).item(), low, high


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        return one(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["screen", "full", "report"])
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--eval")
    p.add_argument("--out", default="sweep")
    p.add_argument("--limit", type=int, default=4000)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--head", type=int, default=HEAD)
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--only", nargs="*", default=None, help="screen: only these configuration names")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.train_flags = argv[cut + 1:]
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.jsonl")
    if args.stage == "report":
        return report(results)
    import data
    with open(os.path.join(args.out, "eval_labels.json"), "w") as f:
        json.dump(data.read_texts(args.eval)[1], f)
    configs = screen_configs(args.head)
    if args.stage == "screen":
        jobs = [(n, f, 42, args.limit) for n, f in configs.items()
                if args.only is None or n in args.only]
    else:
        chosen = best_of_screen(results, args.top)
        jobs = [(n, configs[n], s, None) for n in ["default_qv_r2_lora_1e-3", *chosen]
                for s in args.seeds]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool, open(results, "a") as log:
        running = [pool.submit(run_config, *job[:2], args, *job[2:]) for job in jobs]
        # each as it ends
        for lines in (done.result() for done in concurrent.futures.as_completed(running)):
            for line in lines:
                print(json.dumps(line), flush=True)
                log.write(json.dumps(line) + "\n")
                log.flush()


def read_results(results):
    with open(results) as f:
        return [json.loads(line) for line in f if line.strip()]


def best_of_screen(results, top):
    """The `top` screen configurations (not today's defaults, no trick) by eval accuracy at their
    best epoch."""
    best = {}
    for r in read_results(results):
        name = r.get("name", "")
        if r.get("rows") == "4000" and "error" not in r and "+" not in name \
                and not name.startswith("default"):
            best[r["name"]] = max(best.get(r["name"], 0), r["eval_accuracy"])
    return sorted(best, key=best.get, reverse=True)[:top]


def report(results):
    rows = [r for r in read_results(results) if "error" not in r]
    for kind in ("4000", "all"):
        print(f"\n{kind} rows: name, seed, r, alpha, trainable, eval accuracy at epochs 1/2/3, "
              "val at 3, wall s")
        for name in dict.fromkeys(r["name"] for r in rows if r["rows"] == kind):
            mine = [r for r in rows if r["name"] == name and r["rows"] == kind]
            for seed in sorted({r["seed"] for r in mine}):
                runs = sorted((r for r in mine if r["seed"] == seed), key=lambda r: r["epoch"])
                accs = " / ".join(f"{r['eval_accuracy']:.4f}" for r in runs)
                last = runs[-1]
                print(f"| {name} | {seed} | {last['r']} | {last['alpha']:g} | "
                      f"{last['trainable']:,} | {accs} | {last['val_accuracy']:.4f} | "
                      f"{last['wall_s']} |")
    print_bootstrap(os.path.dirname(results), rows)


def print_bootstrap(folder, rows):
    """Each full-data configuration against today's defaults, at each epoch, both seeds pooled."""
    full = [r for r in rows if r["rows"] == "all"]
    if not full:
        return
    eval_labels = json.load(open(os.path.join(folder, "eval_labels.json")))

    def correct(name, epoch):
        runs = [os.path.join(folder, "runs", f"{name}_seed{s}_all",
                             f"eval_predictions_epoch{epoch}.json")
                for s in sorted({r["seed"] for r in full if r["name"] == name})]
        return [[int(p == y) for p, y in zip(json.load(open(path)), eval_labels)] for path in runs]
    print("\npaired bootstrap against default_qv_r2_lora_1e-3 (eval rows resampled; seeds "
          "pooled): diff [95% interval]")
    for name in dict.fromkeys(r["name"] for r in full if not r["name"].startswith("default")):
        cells = []
        for epoch in (1, 2, 3):
            diff, low, high = paired_bootstrap(correct(name, epoch),
                                               correct("default_qv_r2_lora_1e-3", epoch))
            cells.append(f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
