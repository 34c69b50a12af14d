"""``fedcola-superexec``: Flower's SuperExec whose ClientApp processes start warm.

A SuperNode runs every message in a fresh ``flwr-clientapp`` process, started by its SuperExec; before
it reads the message, that process imports flwr, torch (and ``torch._dynamo``, which the first optimizer
step imports) and the app: about 3 s of CPU per message for fedcola's clients on a 2-core machine, which
dominates a deployed exchange (docs/deploy). ``fedcola-superexec`` is Flower's own ``flower-superexec``
(same arguments, same task polling, tokens and Runtime API) with one change: it imports the app's
libraries once (``--preload``) and launches a task by forking itself; the child runs Flower's
``run_clientapp`` with the task's token, which is what ``flwr-clientapp`` runs. Every message still gets
its own process, and the app's code is still imported from the run's FAB in the child: modules of the
``fedcola`` package are never inherited.

    flower-supernode ... --isolation process --port 9094
    fedcola-superexec --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid <supernode pid>

The fork replaces ``subprocess.Popen`` in Flower's ``SubprocessExecutor`` and nothing else (POSIX only);
``--preload ""`` turns the preloading off.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor

flower_run_superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")  # the module (Flower's SuperExec loop)
flower_get_executor = flower_run_superexec.get_executor

PRELOAD = ("torch,torch._dynamo,torch.func,torch.utils.flop_counter,safetensors.torch,transformers.models.llama.modeling_llama,"
           "flwr.supernode.runtime.run_clientapp")  # the last: Flower's ClientApp runner itself (0.56 s: it imports fastapi)


class ForkExecutor(SubprocessExecutor):
    """Flower's subprocess executor, launching a ClientApp task as a fork of this (preloaded) process."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        if os.fork() == 0:
            _run_task(spec)  # never returns
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap the finished task processes (called by Flower's loop before every poll)."""
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


def _run_task(spec: ExecutionSpec) -> None:
    """In the forked child: Flower's ``run_clientapp`` for the task's token, then exit with its code."""
    code = 0
    try:
        for name in [m for m in sys.modules if m == "fedcola" or m.startswith("fedcola.")]:
            del sys.modules[name]  # the app's code comes from the run's FAB
        if spec.suppress_output:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                      certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
                      parent_pid=spec.parent_pid, runtime_dependency_install=spec.runtime_dependency_install)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - a task's failure ends its process, never the SuperExec
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _executor(executor_type: ExecutorType, *args, **kwargs):
    if executor_type == ExecutorType.SUBPROCESS:
        return ForkExecutor()
    return flower_get_executor(executor_type, *args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preload", default=PRELOAD, help=f"comma-separated modules imported once, before any task (default: {PRELOAD})")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for module in filter(None, (m.strip() for m in args.preload.split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            print(f"fedcola-superexec: cannot preload {module}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    flower_run_superexec.get_executor = _executor  # the one change to Flower's SuperExec
    sys.argv = ["fedcola-superexec", *rest]
    from flwr.supercore.cli.flower_superexec import flower_superexec

    flower_superexec()


if __name__ == "__main__":
    main()
