"""HVAE training and counterfactual throughput on CPU, normalised by the machine's own matmul rate.

For the `cpu` preset's generator and for the reference 64x64 configuration (config.REFERENCE64_ARCH)
at batch 32: parameters, FLOPs per image (forward + backward, counted by FlopCounterMode), training
steps/s and images/s (AdamW as in pretraining, gradient clipping, warm-up steps excluded),
counterfactual images/s (abduct + decode, no grad) and the fraction of a measured fp32 matmul peak.

Machines here differ up to 3x in matmul rate, so a throughput means little alone: a 2-thread fp32
matmul is measured right before every timed window, and each window's images/s is also reported per
GFLOP/s of that measurement (`*_per_gflops`), which compares across machines and busy moments.

Usage: python benchmarks/train_step.py [--out artifacts/bench/train_step.json] [--threads 2]
       [--steps 8] [--repeats 3] [--batch 32] [--configs cpu,reference] [--against REV [--windows 9]]

With `--against REV` (a git revision, e.g. abeaaf4) it instead times the training step of the current
`cxrcf/hvae.py` against that revision's, loaded into a temporary module, in one process: both models
hold the same weights (the old one loads the new one's state_dict, so a key change fails here), their
first losses are compared, and timed windows alternate new, old, new, old, ... so both see the same
machine load; it reports the per-pair ratio new/old and its median. Other implementations can be
timed the same way with `--against-module FILE`: a Python file outside the repo defining
`build(arch) -> model` and `loss(model, x, ctx, beta) -> scalar` (the model's own training objective).

Timings on a shared machine are noisy: each figure is reported as the best and the median of
`--repeats` timed windows, with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def _module_from_source(name: str, source: str, filename: str):
    import types

    mod = types.ModuleType(name)
    mod.__file__ = filename
    sys.modules[name] = mod  # dataclasses look their module up by name
    exec(compile(source, filename, "exec"), mod.__dict__)
    return mod


def hvae_at_revision(rev: str):
    """cxrcf/hvae.py as it was at git revision `rev`, as a module (its imports resolve to today's package)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:cxrcf/hvae.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return _module_from_source(f"_hvae_at_{rev}", src, f"{rev}:cxrcf/hvae.py")


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _inputs(arch, batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, arch.input_channels, arch.resolution, arch.resolution), generator=g)
    x = x.float() / 127.5 - 1
    race = torch.nn.functional.one_hot(torch.randint(0, 3, (batch,), generator=g), 3).float()
    ctx = torch.cat([torch.rand(batch, 1, generator=g) * 2 - 1, race,
                     torch.randint(0, 2, (batch, 2), generator=g).float()], dim=1)
    return x, ctx


def flops_per_image(model, x, ctx, beta: float) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x, ctx, beta)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def bench_config(name: str, arch, batch: int, steps: int, warmup: int, repeats: int, beta: float) -> dict:
    import torch

    from cxrcf.counterfactual import counterfactual
    from cxrcf.hvae import HVAE, count_parameters

    torch.manual_seed(0)
    model = HVAE(arch)
    x, ctx = _inputs(arch, batch)
    ctx_star = ctx.clone()
    ctx_star[:, 4] = 1 - ctx_star[:, 4]
    flops = flops_per_image(model, x, ctx, beta)
    train_step = _make_train_step(model, lambda m, x, ctx, beta: m(x, ctx, beta)["loss"], x, ctx, beta)

    print(f"[{name}] {count_parameters(model):,} parameters, {flops / 1e9:.3f} GFLOP/image fwd+bwd; warming up",
          flush=True)
    for _ in range(warmup):
        train_step()
    train_windows, train_norm = [], []
    for r in range(repeats):
        peak = matmul_peak_gflops(reps=3)
        dt = _timed(lambda: [train_step() for _ in range(steps)])
        train_windows.append(steps / dt)
        train_norm.append(batch * steps / dt / peak)
        print(f"[{name}] train window {r + 1}/{repeats}: {steps / dt:.2f} steps/s = {batch * steps / dt:.1f} img/s "
              f"at {peak:.0f} GFLOP/s matmul ({train_norm[-1]:.3f} img/s per GFLOP/s)", flush=True)

    model.eval()
    gen = torch.Generator().manual_seed(0)
    cf_windows, cf_norm = [], []
    with torch.no_grad():
        counterfactual(model, x, ctx, ctx_star, generator=gen)
        for r in range(repeats):
            peak = matmul_peak_gflops(reps=3)
            dt = _timed(lambda: [counterfactual(model, x, ctx, ctx_star, generator=gen) for _ in range(steps)])
            cf_windows.append(batch * steps / dt)
            cf_norm.append(batch * steps / dt / peak)
            print(f"[{name}] counterfactual window {r + 1}/{repeats}: {batch * steps / dt:.1f} img/s "
                  f"({cf_norm[-1]:.3f} per GFLOP/s)", flush=True)
    best_steps, med_steps = max(train_windows), statistics.median(train_windows)
    return {
        "arch": arch.model_dump(), "batch": batch, "parameters": count_parameters(model), "gflop_per_image": flops / 1e9,
        "train_steps_per_s": {"best": best_steps, "median": med_steps, "windows": train_windows},
        "train_images_per_s": {"best": best_steps * batch, "median": med_steps * batch},
        "counterfactual_images_per_s": {"best": max(cf_windows), "median": statistics.median(cf_windows),
                                         "windows": cf_windows},
        "train_images_per_s_per_gflops": {"best": max(train_norm), "median": statistics.median(train_norm),
                                          "windows": train_norm},
        "counterfactual_images_per_s_per_gflops": {"best": max(cf_norm), "median": statistics.median(cf_norm),
                                                   "windows": cf_norm},
    }


def _make_train_step(model, loss_fn, x, ctx, beta):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.05, fused=True)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, ctx, beta).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        if torch.isfinite(norm) and norm < 1000:
            opt.step()

    return train_step


def bench_against(arch, batch: int, steps: int, warmup: int, windows: int, beta: float,
                  rev: str | None = None, module_file: str | None = None) -> dict:
    """Training steps/s of the current HVAE and of another implementation, windows alternating."""
    import torch

    from cxrcf.hvae import HVAE, count_parameters

    def own_loss(model, x, ctx, beta):
        return model(x, ctx, beta)["loss"]

    torch.manual_seed(0)
    new = HVAE(arch)
    x, ctx = _inputs(arch, batch)
    same_loss = None
    if rev is not None:
        label = rev
        old = hvae_at_revision(rev).HVAE(arch)
        old.load_state_dict(new.state_dict(), strict=True)
        old_loss = own_loss
        with torch.no_grad():
            # the same posterior noise for both (it is drawn from the global generator)
            a = (torch.manual_seed(1), own_loss(new, x, ctx, beta).item())[1]
            b = (torch.manual_seed(1), own_loss(old, x, ctx, beta).item())[1]
        same_loss = {"new": a, "old": b, "rel_diff": abs(a - b) / abs(b)}
        print(f"first loss: new {a:.6f}, {rev} {b:.6f} (relative difference {same_loss['rel_diff']:.1e})", flush=True)
    else:
        label = Path(module_file).stem
        other = _module_from_source(f"_bench_{label}", Path(module_file).read_text(), module_file)
        torch.manual_seed(0)
        old, old_loss = other.build(arch), other.loss
    print(f"new {count_parameters(new):,} parameters, {label} {count_parameters(old):,}", flush=True)
    steps_of = {"new": _make_train_step(new, own_loss, x, ctx, beta),
                "old": _make_train_step(old, old_loss, x, ctx, beta)}
    for fn in steps_of.values():
        for _ in range(warmup):
            fn()
    rates = {"new": [], "old": []}
    peaks = []
    for w in range(windows):
        # alternate which goes first, so a load change within a pair does not always favour one side
        order = ("new", "old") if w % 2 == 0 else ("old", "new")
        peaks.append(matmul_peak_gflops(reps=3))
        for k in order:
            fn = steps_of[k]
            dt = _timed(lambda: [fn() for _ in range(steps)])
            rates[k].append(batch * steps / dt)
        print(f"pair {w + 1}/{windows}: new {rates['new'][-1]:.1f} img/s, {label} {rates['old'][-1]:.1f} img/s, "
              f"ratio {rates['new'][-1] / rates['old'][-1]:.3f} at {peaks[-1]:.0f} GFLOP/s matmul "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    ratios = [a / b for a, b in zip(rates["new"], rates["old"])]
    return {"against": label, "arch": arch.model_dump(), "batch": batch, "steps_per_window": steps,
            "parameters": {"new": count_parameters(new), "old": count_parameters(old)},
            "first_loss": same_loss, "images_per_s": rates, "matmul_gflops": peaks,
            "ratio_new_over_old": {"median": statistics.median(ratios), "windows": ratios}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="artifacts/bench/train_step.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--beta", type=float, default=9.0)
    p.add_argument("--configs", default="cpu,reference")
    p.add_argument("--against", metavar="REV", help="time the training step against cxrcf/hvae.py at this git revision")
    p.add_argument("--against-module", metavar="FILE", help="time it against another implementation (see above)")
    p.add_argument("--windows", type=int, default=9, help="alternated window pairs with --against")
    args = p.parse_args(argv)

    import torch

    from cxrcf.config import REFERENCE64_ARCH, HVAEArch, preset_params
    from cxrcf.fileio import write_json

    torch.set_num_threads(args.threads)
    archs = {"cpu": preset_params("cpu").generator.arch, "reference": HVAEArch(**REFERENCE64_ARCH)}
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in archs]
    if unknown:
        print(f"--configs: unknown {unknown}; expected some of {list(archs)}", file=sys.stderr)
        return 2
    if args.against or args.against_module:
        if len(names) != 1:
            print("--against: name one config in --configs", file=sys.stderr)
            return 2
        load_before = os.getloadavg()
        r = bench_against(archs[names[0]], args.batch, args.steps, args.warmup, args.windows, args.beta,
                          rev=args.against, module_file=args.against_module)
        r.update(config=names[0], threads=args.threads, torch=torch.__version__, loadavg_before=load_before,
                 loadavg_after=os.getloadavg())
        med = r["ratio_new_over_old"]["median"]
        print(f"\n{names[0]}: new/{r['against']} training images/s ratio, median of {args.windows} pairs: {med:.3f} "
              f"(matmul {min(r['matmul_gflops']):.0f}-{max(r['matmul_gflops']):.0f} GFLOP/s, "
              f"load {load_before[0]:.2f} -> {r['loadavg_after'][0]:.2f})")
        write_json(args.out, r)
        print(f"wrote {args.out}")
        return 0
    load_before = os.getloadavg()
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak with {args.threads} threads: {peak:.1f} GFLOP/s (load {load_before[0]:.2f})", flush=True)
    results = {}
    for name in names:
        r = bench_config(name, archs[name], args.batch, args.steps, args.warmup, args.repeats, args.beta)
        # images/s per GFLOP/s times GFLOP/image: the fraction of the same-moment matmul rate achieved
        r["fraction_of_peak"] = {k: r["gflop_per_image"] * r["train_images_per_s_per_gflops"][k]
                                 for k in ("best", "median")}
        results[name] = r
    report = {"threads": args.threads, "torch": torch.__version__, "matmul_peak_gflops": peak,
                  "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "configs": results}
    print(f"\n{'config':<10} {'params':>10} {'GFLOP/img':>9} {'train img/s':>17} {'per GFLOP/s':>11} "
          f"{'cf img/s':>17} {'per GFLOP/s':>11} {'% peak':>7}")
    for name, r in results.items():
        tr, cf = r["train_images_per_s"], r["counterfactual_images_per_s"]
        trn, cfn = r["train_images_per_s_per_gflops"], r["counterfactual_images_per_s_per_gflops"]
        print(f"{name:<10} {r['parameters']:>10,} {r['gflop_per_image']:>9.3f} "
              f"{tr['best']:>7.1f} (med {tr['median']:>5.1f}) {trn['best']:>11.3f} "
              f"{cf['best']:>7.1f} (med {cf['median']:>5.1f}) {cfn['best']:>11.3f} "
              f"{100 * r['fraction_of_peak']['best']:>6.1f}%")
    print(f"load average before {load_before[0]:.2f}, after {report['loadavg_after'][0]:.2f}")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
