"""`ftl run | launch | plan | merge | pipeline | eval`: the command line. Errors from bad input print one clear line, no traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys

from ftl.errors import FtlError, LaunchError


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may follow flags (`--dry-run train.lr=1e-4`), which argparse leaves over
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    try:
        code = args.handler(args)
    except FtlError as err:
        print(f"ftl: error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftl", description="Fine-tuning launcher: one recipe, any machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe in this process (what every launcher starts)")
    _recipe_args(run)
    run.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    run.set_defaults(handler=cmd_run)

    launch = sub.add_parser("launch", help="build and run the launcher command for the recipe's profile")
    _recipe_args(launch)
    launch.add_argument("--resume", action="store_true")
    launch.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    launch.add_argument("--force", action="store_true", help="launch even when the plan says it cannot fit")
    launch.set_defaults(handler=cmd_launch)

    plan = sub.add_parser("plan", help="print the launch command and a per-device memory estimate")
    _recipe_args(plan)
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
    pipe.set_defaults(handler=cmd_pipeline)

    ev = sub.add_parser("eval", help="evaluate a run directory or a model folder")
    ev.add_argument("target", help="run directory (from ftl run) or a model folder")
    ev.add_argument("--data", help="a data file to evaluate on (default: the run's validation split)")
    ev.add_argument("--format", default=None, help="record format of --data (default: the run's)")
    ev.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    ev.add_argument("--out", default=None, help="where to write eval.json / eval.md (default: target)")
    ev.set_defaults(handler=cmd_eval)
    return parser


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--profile", "-p", default=None, help="profile to apply (tiny, small, gpu1, node8, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")


def cmd_run(args) -> int:
    from ftl.runner import run_recipe

    import os

    result = run_recipe(args.recipe, args.profile, args.overrides, resume=args.resume)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        from ftl.stages.session import exit_cleanly

        exit_cleanly(0)  # DeepSpeed ranks sporadically SIGABRT during interpreter teardown
    return 0 if result is not None else 1


def cmd_launch(args) -> int:
    from ftl.config import load_recipe
    from ftl.launch.command import build_launch_command, runnable

    from ftl.plan import make_plan, render_plan

    recipe = load_recipe(args.recipe, args.profile, args.overrides)
    command = build_launch_command(recipe, args.recipe, args.overrides, resume=args.resume)
    plan = make_plan(recipe)
    print(render_plan(plan).split("\n\n")[0], flush=True)
    if not plan.fits and not args.force:
        raise LaunchError("the plan does not fit the profile's device memory (see above); choose a higher "
                          "ZeRO stage, offload, LoRA/QLoRA or more devices — or pass --force")
    print(f"ftl: launch command:\n  {command.shell()}", flush=True)
    if args.dry_run:
        return 0
    argv, env = runnable(command)
    return subprocess.run(argv, env=env).returncode


def cmd_plan(args) -> int:
    from ftl.config import load_recipe
    from ftl.launch.command import build_launch_command
    from ftl.plan import make_plan, render_plan

    recipe = load_recipe(args.recipe, args.profile, args.overrides)
    command = build_launch_command(recipe, args.recipe, args.overrides)
    print(render_plan(make_plan(recipe, [command.shell()])))
    return 0


def cmd_merge(args) -> int:
    from ftl.models.merge import merge_run

    target = merge_run(args.run_dir, args.out, args.dtype)
    print(f"ftl: merged model saved to {target}")
    return 0


def cmd_pipeline(args) -> int:
    from ftl.pipeline import run_pipeline

    run_pipeline(args.pipeline, args.profile, force=args.force)
    return 0


def cmd_eval(args) -> int:
    from ftl.evaluate.cli import evaluate_target

    evaluate_target(args.target, data=args.data, fmt=args.format, split=args.split, out=args.out)
    return 0
