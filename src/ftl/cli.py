"""The `ftl` command line: `ftl run | launch | plan | merge | pipeline | eval | chat | compare | slurm | recipes`.

The parser, and one handler per command that imports what it needs when it runs. An FtlError (bad
recipe, data or launch settings) prints one clear line and exits 2, with no traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ftl.errors import FtlError, LaunchError
from ftl.process_exit import exit_cleanly


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may follow flags (`--dry-run train.lr=1e-4`), which argparse leaves over
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    from ftl.console import quiet_known_noise

    quiet_known_noise(getattr(args, "verbose", False))  # before any handler imports the libraries
    try:
        code = args.handler(args)
    except FtlError as err:
        print(f"ftl: error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)


class Parser(argparse.ArgumentParser):
    """Bad arguments end like any bad input: the usage, then one `ftl: error:` line naming the command.
    No abbreviated flags: `--resum` is a typo to refuse, not a --resume to guess."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.print_usage(sys.stderr)
        command = self.prog.removeprefix("ftl").strip()
        print(f"ftl: error: {command + ': ' if command else ''}{message}", file=sys.stderr)
        sys.exit(2)


class PrintVersion(argparse.Action):
    """Like action="version", without argparse re-wrapping the line to the terminal's width."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ftl", description="Fine-tuning launcher: one recipe, any machine.")
    parser.add_argument("--version", action=PrintVersion, help="ftl's version and those of the libraries it drives")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe in this process (what every launcher starts)")
    _recipe_args(run)
    run.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run already in the output folder (once the new recipe and data validate)")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved recipe (profile and overrides applied) and run nothing")
    run.set_defaults(handler=cmd_run)

    recipes = sub.add_parser("recipes", help="list the shipped recipes with their descriptions and profiles")
    recipes.add_argument("folder", nargs="?", default=None, help="folder of recipes (default: ./recipes)")
    recipes.set_defaults(handler=cmd_recipes)

    launch = sub.add_parser("launch", help="build and run the launcher command for the recipe's profile")
    _recipe_args(launch)
    launch.add_argument("--resume", action="store_true")
    launch.add_argument("--overwrite", action="store_true", help="replace the run already in the output folder")
    launch.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    launch.add_argument("--force", action="store_true", help="launch even when the plan says it cannot fit")
    launch.add_argument("--machine-rank", type=int, default=None,
                        help="multi-node: this node's rank (the Slurm scripts pass $SLURM_NODEID)")
    launch.add_argument("--main-ip", default=None, help="multi-node: address of the first node (rendezvous)")
    launch.set_defaults(handler=cmd_launch)

    plan = sub.add_parser("plan", help="print the launch command and a per-device memory estimate")
    _recipe_args(plan)
    plan.add_argument("--data", action="store_true",
                      help="read and tokenise the recipe's data for its longest rows (default: every row at "
                           "data.max_length, an upper bound)")
    plan.set_defaults(handler=cmd_plan)

    merge = sub.add_parser("merge", help="merge a run's LoRA/DoRA/QLoRA adapter into its base model")
    merge.add_argument("run_dir")
    merge.add_argument("--out", default=None, help="output folder (default: RUN_DIR/merged)")
    merge.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="dtype of the merged model (default: the base's compute dtype)")
    merge.set_defaults(handler=cmd_merge)

    pipe = sub.add_parser("pipeline", help="run a pipeline of stages (e.g. SFT → reward model → PPO)")
    pipe.add_argument("pipeline", help="pipeline YAML (e.g. recipes/rlhf/pipeline.yaml)")
    pipe.add_argument("--profile", "-p", default=None)
    pipe.add_argument("--force", action="store_true", help="rerun stages even when unchanged and complete")
    pipe.add_argument("--slurm", action="store_true", help="submit each stage as a Slurm job (afterok chain)")
    pipe.add_argument("--dry-run", action="store_true", help="with --slurm: print the sbatch commands only")
    _verbose_arg(pipe)
    _job_args(pipe)
    pipe.set_defaults(handler=cmd_pipeline)

    ev = sub.add_parser("eval", help="evaluate a run directory or a model folder as its stage's kind of model "
                                     "(language model, classifier, reward model, policy)")
    ev.add_argument("target", help="run directory (from ftl run) or a model folder")
    ev.add_argument("--data", help="a data file to evaluate on (default: the run's --split)")
    ev.add_argument("--format", default=None, help="record format of --data (default: the run's)")
    ev.add_argument("--split", default="validation", choices=["train", "validation", "test"],
                    help="the run's own split to score, re-made from its data section (default: validation)")
    ev.add_argument("--out", default=None, help="where to write eval.json / eval.md (default: TARGET/eval)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where to evaluate (default auto: CUDA when present; a 4/8-bit model stays where it loaded)")
    ev.add_argument("--reward", default=None, metavar="REWARD_MODEL",
                    help="a policy run: score with this reward-model folder instead of the run's reward (a judge)")
    ev.add_argument("--prompts-from", default=None, metavar="POLICY_RUN",
                    help="a policy run: compare on this other policy run's held-out prompts and sampling settings")
    _verbose_arg(ev)
    ev.set_defaults(handler=cmd_eval)

    chat = sub.add_parser("chat", help="talk to a run's trained model or a model folder: one --prompt, or a "
                                       "conversation read from stdin (/reset clears it, /exit quits)")
    chat.add_argument("target", help="run directory (from ftl run) or a model folder")
    chat.add_argument("--prompt", default=None, help="one message: print the reply and exit")
    chat.add_argument("--system", default=None, help="system prompt (default: the run's data.system_prompt; '' for none)")
    chat.add_argument("--max-new-tokens", type=int, default=128, help="reply length limit in tokens (default 128)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampled")
    chat.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                      help="where to generate (default auto: CUDA when present)")
    _verbose_arg(chat)
    chat.set_defaults(handler=cmd_chat)

    compare = sub.add_parser("compare", help="run a recipe's compare.variants (methods, from scratch) and report")
    _recipe_args(compare)
    compare.add_argument("--variants", default=None, help="comma-separated subset of compare.variants")
    compare.add_argument("--out", default=None, help="report folder (default: runs/compare-NAME-PROFILE)")
    compare.set_defaults(handler=cmd_compare)

    slurm = sub.add_parser("slurm", help="submit, watch and cancel Slurm jobs").add_subparsers(
        dest="slurm_command", required=True)
    submit = slurm.add_parser("submit", help="render the recipe's sbatch script, print it and submit it")
    _recipe_args(submit)
    submit.add_argument("--nodes", type=int, default=None, help="nodes (default: the recipe's launch.num_machines)")
    submit.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node (default: launch.num_processes on GPU profiles)")
    _job_args(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the script and sbatch command only")
    submit.set_defaults(handler=cmd_slurm_submit)
    status = slurm.add_parser("status", help="state of jobs, or of a pipeline's stage jobs (default: squeue)")
    status.add_argument("targets", nargs="*", help="job ids or pipeline folders (from ftl pipeline --slurm)")
    status.set_defaults(handler=cmd_slurm_status)
    cancel = slurm.add_parser("cancel", help="cancel jobs, or all of a pipeline's stage jobs")
    cancel.add_argument("targets", nargs="+", help="job ids or pipeline folders")
    cancel.set_defaults(handler=cmd_slurm_cancel)
    end = slurm.add_parser("job-end", help="(called by the job scripts) requeue a preempted run, finish a stage")
    end.add_argument("code", type=int, help="the training step's exit code")
    _recipe_args(end)
    end.set_defaults(handler=cmd_slurm_job_end)
    return parser


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    p.add_argument("--account", default=None)
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="cores per node (default: launch.cpus_per_task, else 8 per GPU or one per CPU rank)")
    p.add_argument("--mem", default=None,
                   help="memory per node, as Slurm writes it, e.g. 256G (default: launch.mem, else sized by ftl plan "
                        "on GPU profiles)")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this long before the time limit: the run checkpoints and the job requeues")


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show every library's messages, including those ftl hides as known and harmless")


def _recipe_args(p: argparse.ArgumentParser) -> None:
    _verbose_arg(p)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--profile", "-p", default=None, type=lambda name: name or None,
                   help="profile to apply (tiny, small, gpu1, node8, ...)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.lr=1e-4")


# -- handlers ------------------------------------------------------------------------------------
# Their imports are local: `ftl --help` and bad-argument errors must not import torch (~7 s), and even
# the recipe schema (pydantic, ~0.15 s) would make them several times slower.

def version_line() -> str:
    """ftl's version and the versions of what it drives, read from package metadata (no imports)."""
    from importlib import metadata

    import ftl

    def installed(name: str) -> str:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return f"{name} (not installed)"

    libraries = ("torch", "transformers", "accelerate", "deepspeed", "peft", "trl", "bitsandbytes")
    return f"ftl {ftl.__version__} ({', '.join(installed(n) for n in libraries)})"


def cmd_run(args) -> int:
    if args.print_config:
        return print_config(args)
    from ftl.console import capture
    from ftl.runner import run_recipe

    capture()  # saved as RUN_DIR/run.log once the run's folder may be written
    result = run_recipe(args.recipe, args.profile, args.overrides, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        exit_cleanly(0)  # DeepSpeed ranks sporadically SIGABRT during interpreter teardown
    return 0 if result is not None else 1


def print_config(args) -> int:
    """The recipe as the run would save it (secrets as ***), nothing run and nothing written."""
    import yaml

    from ftl.config import load_recipe
    from ftl.config.load import redacted_dict

    recipe = load_recipe(args.recipe, args.profile, args.overrides)
    print(yaml.safe_dump(redacted_dict(recipe), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_recipes(args) -> int:
    from ftl.catalog import catalog, render

    print(render(catalog(args.folder)))
    return 0


def cmd_launch(args) -> int:
    from ftl.config import load_recipe
    from ftl.launch.command import NodeRole, build_launch_command, runnable
    from ftl.launch.slurm_grant import fit_to_grant
    from ftl.models.attention import check_attention
    from ftl.plan import make_plan, render_plan

    if (args.machine_rank is None) != (args.main_ip is None):
        raise LaunchError("--machine-rank and --main-ip go together (multi-node launches)")
    node = NodeRole(args.machine_rank, args.main_ip) if args.main_ip else None
    grant = fit_to_grant(load_recipe(args.recipe, args.profile, args.overrides), args.overrides)
    if grant.message:
        print(grant.message, flush=True)
    recipe = load_recipe(args.recipe, args.profile, grant.overrides)
    check_attention(recipe)  # before any rank starts (each rank checks again)
    command = build_launch_command(recipe, args.recipe, grant.overrides, resume=args.resume, node=node,
                                   overwrite=args.overwrite)
    plan = make_plan(recipe)
    print(render_plan(plan).split("\n\n")[0], flush=True)
    if not plan.fits and not args.force:
        raise LaunchError("the plan does not fit the profile's device memory (see above); choose a higher "
                          "ZeRO stage, offload, LoRA/QLoRA or more devices — or pass --force")
    print(f"ftl: launch command:\n  {command.shell()}", flush=True)
    if args.dry_run:
        return 0
    if node is None or node.machine_rank == 0:  # refuse before any rank starts (each rank checks again)
        from ftl.run_dir import run_dir_for
        from ftl.runner import check_run_folder

        check_run_folder(run_dir_for(recipe), args.resume, args.overwrite)
    from ftl.runner import locate_hub_repos

    locate_hub_repos(recipe)  # each node fetches (or, offline, finds) a hub model once, before its ranks start
    argv, env = runnable(command)
    return subprocess.run(argv, env=env).returncode


def cmd_plan(args) -> int:
    from ftl.config import load_recipe
    from ftl.launch.command import build_launch_command
    from ftl.plan import DataLengths, data_lengths, make_plan, render_plan

    recipe = load_recipe(args.recipe, args.profile, args.overrides)
    command = build_launch_command(recipe, args.recipe, args.overrides)
    lengths = data_lengths(recipe) if args.data else DataLengths()
    print(render_plan(make_plan(recipe, [command.shell()], lengths=lengths)))
    return 0


def cmd_merge(args) -> int:
    from ftl.models.merge import merge_run

    target = merge_run(args.run_dir, args.out, args.dtype)
    print(f"ftl: merged model saved to {target}")
    return 0


def cmd_pipeline(args) -> int:
    if args.slurm:
        from ftl.slurm.pipeline_jobs import submit_pipeline

        submit_pipeline(args.pipeline, args.profile, job_options(args), force=args.force, dry_run=args.dry_run)
        return 0
    if args.dry_run:
        raise LaunchError("--dry-run goes with --slurm (a local pipeline runs its stages)")
    from ftl.pipeline import run_pipeline

    run_pipeline(args.pipeline, args.profile, force=args.force)
    return 0


def cmd_compare(args) -> int:
    from ftl.compare import run_compare

    only = [v.strip() for v in args.variants.split(",")] if args.variants else None
    run_compare(args.recipe, args.profile, args.overrides, only, args.out)
    return 0


def job_options(args):
    from ftl.slurm.script import JobOptions

    return JobOptions(nodes=getattr(args, "nodes", None), gpus_per_node=getattr(args, "gpus_per_node", None),
                      cpus_per_task=args.cpus_per_task, mem=args.mem, partition=args.partition, time=args.time,
                      account=args.account, signal_seconds=args.signal_seconds)


def cmd_slurm_submit(args) -> int:
    from ftl.slurm.submit import submit_recipe

    submit_recipe(args.recipe, args.profile, args.overrides, job_options(args), dry_run=args.dry_run)
    return 0


def cmd_slurm_status(args) -> int:
    from ftl.slurm import jobs
    from ftl.slurm.status import report

    if not args.targets:
        print(jobs.queue(), end="")
        return 0
    text, code = report(args.targets)
    print(text)
    return code


def cmd_slurm_cancel(args) -> int:
    from ftl.slurm.status import cancel

    print(f"ftl slurm: cancelled {' '.join(cancel(args.targets)) or 'nothing'}")
    return 0


def cmd_slurm_job_end(args) -> int:
    from ftl.slurm.job_end import job_end

    return job_end(args.code, args.recipe, args.profile, args.overrides)


def cmd_eval(args) -> int:
    from ftl.evaluate.target import evaluate_target

    evaluate_target(args.target, data=args.data, fmt=args.format, split=args.split, out=args.out,
                    device=args.device, reward=args.reward, prompts_from=args.prompts_from)
    return 0


def cmd_chat(args) -> int:
    from ftl.chat import run_chat

    run_chat(args.target, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, device=args.device)
    return 0
