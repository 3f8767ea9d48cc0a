"""Build the command that starts `ftl run` for a recipe's launch settings: one function per launcher
(python, accelerate, torchrun, deepspeed) in LAUNCHERS, each given this node's role on multi-node jobs
and a recipe whose rendezvous port is decided (port.py); `runnable` turns a command into the argv and
environment to execute from this interpreter."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ftl.config.environment import expand_launch_env, has_reference
from ftl.config.schema import Recipe
from ftl.config.secret_keys import REDACTED, hide, is_secret, redact_override
from ftl.errors import LaunchError
from ftl.launch.port import main_process_port


@dataclass
class LaunchCommand:
    """argv, and the environment it adds: launch.env as the recipe writes it, `${VAR}` references unexpanded
    until runnable() (so the command can be shown without the values)."""
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command to show, never to run: secrets as ***, references left for the shell to expand."""
        env = " ".join(f"{k}={shown_env_value(k, v)}" for k, v in self.env.items())
        argv = " ".join(shlex.quote(hide(redact_override(a))) for a in self.argv)
        return (env + " " if env else "") + argv


def shown_env_value(name: str, value: str) -> str:
    if has_reference(value):  # "${HF_TOKEN}": a pasted command expands it like ftl does
        return '"' + "".join("\\" + c if c in '"\\`' else c for c in value) + '"'
    return REDACTED if is_secret(("launch", "env", name), value) else shlex.quote(hide(value))


def ftl_run_args(recipe_path: str, profile: str | None, overrides: list[str], resume: bool,
                 overwrite: bool = False) -> list[str]:
    args = ["-m", "ftl", "run", str(recipe_path)]
    if profile:
        args += ["--profile", profile]
    if resume:
        args.append("--resume")
    if overwrite:
        args.append("--overwrite")
    return args + list(overrides)


@dataclass
class NodeRole:
    """This machine's place in a multi-node job: its rank and the first node's address, where the
    c10d rendezvous is hosted (the Slurm scripts read both inside each node's task)."""
    machine_rank: int
    main_ip: str

    def rdzv_conf(self) -> str:
        # explicit: on emulated nodes sharing one address every node would think it is the host
        return f"is_host={'true' if self.machine_rank == 0 else 'false'}"


def build_launch_command(recipe: Recipe, recipe_path: str, overrides: list[str] = (),
                         resume: bool = False, python: str = "python",
                         node: Optional[NodeRole] = None, overwrite: bool = False) -> LaunchCommand:
    launch = recipe.launch
    if node and launch.num_machines == 1:
        raise LaunchError("--machine-rank/--main-ip are for multi-node launches (launch.num_machines > 1)")
    run_args = ftl_run_args(recipe_path, recipe.profile, overrides, resume, overwrite)
    expand_launch_env(launch.env, recipe_path)  # an unset ${VAR} is refused now, not when the run starts
    hidden = [name for name, value in launch.env.items() if value == REDACTED]
    if hidden:  # a run folder's recipe.yaml: the value was never written, so it cannot be launched from it
        raise LaunchError(f"{recipe_path}: launch.env.{hidden[0]} is '{REDACTED}', a secret ftl hid when it saved "
                          f"this recipe; refer to the environment instead ({hidden[0]}: ${{{hidden[0]}}}) and "
                          "export the variable")
    env = dict(launch.env)
    port = main_process_port(launch.main_process_port, multi_node=launch.num_machines > 1)
    # the launchers read the port from the recipe: give them one with it decided
    recipe = recipe.model_copy(update={"launch": launch.model_copy(update={"main_process_port": port})})
    if launch.device == "cpu":
        # 2 ranks x 2 threads on 2 cores ran 12x slower than 1 thread each
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.num_processes)))
    command = LAUNCHERS.get(launch.launcher)
    if command is None:
        raise LaunchError(f"launch.launcher '{launch.launcher}' is not supported")
    return command(recipe, run_args, env, node, python)


# A launcher: (recipe, the `-m ftl run ...` arguments, environment, this node's role on a multi-node job
# or None, the interpreter the python launcher starts) -> the command.
Launcher = Callable[[Recipe, list[str], dict[str, str], Optional[NodeRole], str], LaunchCommand]


def python_command(recipe: Recipe, run_args: list[str], env: dict[str, str], node: Optional[NodeRole],
                   python: str) -> LaunchCommand:
    if recipe.launch.num_processes * recipe.launch.num_machines != 1:
        raise LaunchError("launch.launcher 'python' runs one process; use accelerate or torchrun for more")
    return LaunchCommand([python] + run_args, env)


def accelerate_command(recipe: Recipe, run_args: list[str], env: dict[str, str], node: Optional[NodeRole],
                       python: str) -> LaunchCommand:
    return LaunchCommand(accelerate_argv(recipe, node) + run_args, env)


def torchrun_command(recipe: Recipe, run_args: list[str], env: dict[str, str], node: Optional[NodeRole],
                     python: str) -> LaunchCommand:
    launch = recipe.launch
    argv = ["torchrun", f"--nproc_per_node={launch.num_processes}", f"--nnodes={launch.num_machines}"]
    if node:
        argv += [f"--node_rank={node.machine_rank}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint={node.main_ip}:{launch.main_process_port}", f"--rdzv_conf={node.rdzv_conf()}"]
    else:
        argv.append(f"--master_port={launch.main_process_port}")
    return LaunchCommand(argv + run_args, env)


def deepspeed_command(recipe: Recipe, run_args: list[str], env: dict[str, str], node: Optional[NodeRole],
                      python: str) -> LaunchCommand:
    launch = recipe.launch
    if node:
        raise LaunchError("launch.launcher 'deepspeed' starts remote nodes itself (pdsh/ssh); under Slurm, "
                          "where srun starts one task per node, use launcher accelerate or torchrun")
    # --no_local_rank: ftl reads LOCAL_RANK from the environment
    return LaunchCommand(["deepspeed", f"--num_gpus={launch.num_processes}", f"--num_nodes={launch.num_machines}",
                          f"--master_port={launch.main_process_port}", "--no_local_rank", "--module"]
                         + run_args[1:], env)


# one entry per LaunchConfig.launcher value (a test ties the two)
LAUNCHERS: dict[str, Launcher] = {
    "python": python_command,
    "accelerate": accelerate_command,
    "torchrun": torchrun_command,
    "deepspeed": deepspeed_command,
}


def accelerate_argv(recipe: Recipe, node: Optional[NodeRole] = None) -> list[str]:
    launch = recipe.launch
    total = launch.num_processes * launch.num_machines
    argv = ["accelerate", "launch"]
    if launch.config_file:
        if not Path(launch.config_file).exists():
            raise LaunchError(f"launch.config_file: {launch.config_file} does not exist")
        argv += ["--config_file", launch.config_file]
    if total > 1 and not launch.config_file:
        # `--cpu --num_processes 2` silently starts ONE process; --multi_gpu starts them all and
        # ftl picks gloo on CPU itself.
        argv.append("--multi_gpu")
    if not launch.deepspeed:  # with DeepSpeed, precision lives in the JSON ("auto" ← train.precision)
        argv += ["--mixed_precision", {"fp32": "no"}.get(recipe.train.precision, recipe.train.precision)]
    argv += ["--dynamo_backend", "no", "--num_processes", str(total), "--num_machines", str(launch.num_machines),
             "--main_process_port", str(launch.main_process_port)]
    if launch.num_machines == 1:
        argv += ["--machine_rank", "0"]
    elif node:
        argv += ["--machine_rank", str(node.machine_rank), "--main_process_ip", node.main_ip,
                 "--rdzv_backend", "c10d", "--rdzv_conf", node.rdzv_conf()]
        if config_uses_deepspeed(launch.config_file):
            # each node's task starts its own ranks (torchrun); DeepSpeed's default pdsh would ssh
            argv += ["--deepspeed_multinode_launcher", "standard"]
    return argv


def config_uses_deepspeed(config_file: Optional[str]) -> bool:
    import yaml

    return bool(config_file) and (yaml.safe_load(Path(config_file).read_text()) or {}).get(
        "distributed_type") == "DEEPSPEED"


def runnable(command: LaunchCommand) -> tuple[list[str], dict[str, str]]:
    """The argv to execute here (launchers run from this interpreter) and the full environment."""
    argv = list(command.argv)
    if argv[0] == "accelerate":
        argv = [sys.executable, "-m", "accelerate.commands.launch"] + argv[2:]
    elif argv[0] == "deepspeed":
        argv = [sys.executable, "-m", "deepspeed.launcher.runner"] + argv[1:]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run"] + argv[1:]
    elif argv[0] == "python":
        argv[0] = sys.executable
    return argv, {**os.environ, **expand_launch_env(command.env, "the launch command")}
