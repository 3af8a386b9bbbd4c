"""Train a model: `python -m scripts.train --preset small --steps 500 --out runs/demo [--data PATH]
[--mesh data=2,fsdp=2,tensor=2] [--set train.lr=3e-4 --set model.n_layers=4 ...] [--explain]`.

Resumes automatically from `--out`'s newest checkpoint that restores, on any mesh (damaged newer ones are
reported and renamed `<step>.broken`). One trainer per `--out`: a second one exits at once with code 2 naming
the first. By default the run is data parallel over every device. Multi-process runs: every process runs this
same command with --coordinator, --num-processes and --process-id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); inside a multi-task SLURM job (`srun`) JAX finds them itself.
`python -m scripts.launch_local` starts N local processes for testing.

Ctrl-C or SIGTERM finishes the current step, saves it, and exits with 130 (SIGINT) or 143 (SIGTERM) after one
line saying how to resume; a second Ctrl-C aborts at once. `--extend N` continues a finished run for N steps past
its schedule at the final learning rate. `--profile START:STOP` traces those steps into `--out`/profile."""

from __future__ import annotations

import argparse
import shlex
import sys

from tqdm import tqdm

from scripts.common import fail, out_of_memory, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset (tiny, small, 125m, 350m, 1b, 7b)")
    p.add_argument("--steps", type=int, help="optimizer steps (= --set train.steps=N)")
    p.add_argument("--extend", type=int, metavar="N",
                   help="N steps past the schedule's end at its final learning rate, to continue a finished run "
                        "(= --set train.extend_steps=N; counted from train.steps, not cumulative)")
    p.add_argument("--profile", metavar="START:STOP",
                   help="capture a jax.profiler trace of steps START to STOP into OUT/profile (TensorBoard's "
                        "profile plugin or ui.perfetto.dev)")
    p.add_argument("--out", required=True, help="run directory: config.json, metrics.jsonl, checkpoints/")
    p.add_argument("--data", help="a text file, a folder or a glob (default: the Python standard library)")
    p.add_argument("--tokenizer", help="bytes (default), a tokenizer.json, hf:DIR or gguf:FILE (= --set "
                                       "train.tokenizer=...; the run keeps a copy; default with --init: its model's)")
    p.add_argument("--init", metavar="SOURCE",
                   help="start from pretrained weights: hf:DIR, gguf:FILE or run:DIR[@STEP]; the model config comes "
                        "from it (--preset is ignored), the optimizer starts fresh")
    p.add_argument("--sft", metavar="CHAT.jsonl",
                   help="supervised fine-tuning on a JSONL of {\"messages\": [...]}: loss on assistant tokens only "
                        "(= --set train.data=CHAT.jsonl --set train.sft=true)")
    p.add_argument("--mesh", help="devices per mesh axis, e.g. data=2,fsdp=2,tensor=2 (axes: data, fsdp, tensor, "
                                  "sequence, stage, expert; one may be -1 = the rest; default data=-1)")
    p.add_argument("--explain", action="store_true",
                   help="before training, print the compiled step's collectives and memory per device, next to "
                        "the accounting's predictions")
    p.add_argument("--coordinator", help="multi-process: host:port of process 0's coordinator")
    p.add_argument("--num-processes", type=int, help="multi-process: how many processes in the run")
    p.add_argument("--process-id", type=int, help="multi-process: this process's index, 0 to num-processes - 1")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. train.lr=3e-4 or model.n_layers=4 (repeatable)")
    p.add_argument("--peak-tflops", type=float, help="one device's peak for MFU (default: from the device kind)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    """The RunConfig named by the arguments; a bad preset, key or value exits with code 2."""
    from model.presets import get_preset
    from parallel.mesh import parse_mesh
    from train.config import RunConfig, TrainConfig, apply_overrides

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.insert(0, f"train.steps={args.steps}")
    if args.extend is not None:
        overrides.insert(0, f"train.extend_steps={args.extend}")
    if args.data is not None:
        overrides.insert(0, f"train.data={args.data}")
    if args.sft is not None:
        overrides[:0] = [f"train.data={args.sft}", "train.sft=true"]
    tokenizer = args.tokenizer
    if args.init is not None:
        overrides.insert(0, f"train.init={args.init}")
        tokenizer = tokenizer or args.init  # the pretrained model's own tokenizer
    if tokenizer is not None:
        overrides.insert(0, f"train.tokenizer={tokenizer}")
    try:
        if args.init is not None:
            from train.pretrained import check_matches_source, source_model_config

            model = source_model_config(args.init)
        else:
            model = get_preset(args.preset)
        base = RunConfig(model=model, train=TrainConfig(seq_len=min(TrainConfig.seq_len, model.max_seq_len)))
        if args.mesh is not None:
            base = RunConfig(model=base.model, train=base.train, mesh=parse_mesh(args.mesh))
        cfg = apply_overrides(base, overrides)
        if args.init is not None:
            check_matches_source(cfg.model, model, args.init)
        return cfg
    except (ValueError, TypeError, FileNotFoundError) as e:
        fail(str(e))


def explain_step(compiled, plan, cfg) -> str:
    """The compiled step's collectives and memory per device, then the same next to the accounting's figures."""
    from parallel.explain import explain, format_report
    from scaling.measured import compare, format_comparison

    report = explain(compiled, plan.mesh)
    m, t = plan.mesh_cfg, cfg.train
    rows = compare(report, cfg.model, micro_batch=t.batch_size // t.grad_accum // (m.data * m.fsdp * m.expert),
                   seq_len=t.seq_len, n_microbatches=t.grad_accum, param_bytes=cfg.model.weight_dtype.itemsize,
                   compute_bytes=cfg.model.compute_dtype.itemsize,
                   sequence_impl="ring" if cfg.model.attention_impl == "ring" else "ulysses")
    return f"{format_report(report)}\n\nagainst scaling.accounting:\n{format_comparison(rows)}"


def join_run(args: argparse.Namespace) -> bool:
    """Join the multi-process run the flags or environment describe (if any); True on the primary process."""
    from parallel.distributed import initialize, resolve_distributed

    try:
        dist = resolve_distributed(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        fail(str(e))
    initialize(dist)
    import jax

    return jax.process_index() == 0


def progress_to(bar: tqdm, step: int) -> None:
    """Move `bar` to `step`. The first move restarts its clock there, so its rate and ETA count only steps run
    after the first record: not compilation, not the first step's warm-up, not steps done before a resume."""
    if not getattr(bar, "started", False):
        bar.reset()
        bar.initial = bar.n = bar.last_print_n = step
        bar.started = True
    else:
        bar.n = step


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = build_config(args)
    try:
        from train.profile import parse_steps

        profile = parse_steps(args.profile) if args.profile else None
    except ValueError as e:
        fail(str(e))
    primary = join_run(args)
    setup_logging(args.log_level if primary else "WARNING")
    say = print if primary else (lambda *a, **k: None)
    say(cfg.to_json())

    from scaling.accounting import flops_per_token, param_count
    from scaling.hardware import peak_flops
    from scripts.interrupt import StopOnSignal
    from train.loop import NonFiniteError, TrainingInterrupted, train
    from train.run_dir import RunDirInUse

    say(f"parameters: {param_count(cfg.model)['total']:,}  tokens per step: "
        f"{cfg.train.batch_size * cfg.train.seq_len:,}  out: {args.out}")
    import jax

    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(str(cfg.model.compute_dtype))
    if peak and jax.default_backend() != "cpu":  # fake CPU devices share one machine's peak
        peak *= jax.device_count()
    bar = tqdm(total=cfg.train.steps + cfg.train.extend_steps, desc="train", unit="step", dynamic_ncols=True,
               disable=not primary)
    shown: dict = {}

    def on_compiled(compiled, plan) -> None:
        say(f"mesh: {plan.mesh_cfg.describe()} over {plan.mesh.devices.size} devices in {jax.process_count()} "
            f"process(es)")
        if args.explain and primary:
            tqdm.write(explain_step(compiled, plan, cfg))

    def on_record(record: dict) -> None:
        progress_to(bar, record["step"])
        for key in ("loss", "router_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_bpb"):
            if record.get(key) is not None:
                shown[key] = record[key]
        fmt = {"loss": ".4f", "router_loss": ".4f", "lr": ".2e", "grad_norm": ".3f", "tokens_per_s": ".0f",
               "mfu": ".1%", "val_loss": ".4f", "val_bpb": ".3f"}
        bar.set_postfix_str("  ".join(f"{k} {format(v, fmt[k])}" for k, v in shown.items()), refresh=True)

    try:
        with StopOnSignal() as stop:
            last = train(cfg, args.out, flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
                         peak_flops=peak, on_record=on_record, on_compiled=on_compiled, should_stop=stop,
                         profile=profile)
    except TrainingInterrupted as e:
        bar.close()
        say(f"interrupted at step {e.step}; checkpoint saved in {e.checkpoint}; resume with: python -m "
            f"scripts.train {shlex.join(argv)}", flush=True)
        return stop.exit_code
    except NonFiniteError as e:
        bar.close()
        fail(str(e), code=1)
    except (ValueError, FileNotFoundError, RunDirInUse) as e:  # bad input, a damaged run, or --out in use
        bar.close()
        fail(str(e))
    except Exception as e:  # XLA's out-of-memory: one line, not the allocator's dump
        if (message := out_of_memory(e)) is None:
            raise
        bar.close()
        fail(f"{message}; checkpoints already written in {args.out} are kept", code=1)
    bar.close()
    say(f"done: step {last.get('step')}  " + "  ".join(f"{k} {v:.4f}" for k, v in last.items()
                                                       if k.startswith("val") and v is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
