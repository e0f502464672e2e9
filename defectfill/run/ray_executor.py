"""`defectfill run --executor ray`: each defect type's training, generation and evaluation as one Ray task.

The driver (the `defectfill run` process) holds the run folder's lock, submits one task per (category,
defect type) asking for --gpus-per-task GPUs, and writes synth/, the report and summary.json as the local
executor does. A task runs the local executor's own `process.process_type`, so skip-when-complete, the per-type
lock and the failure isolation are the same; every node must see the output folder at the same path
(shared storage is the user's).

A task whose worker dies (killed, out of memory, node lost) is run again by Ray, up to --task-retries
times; the retry finds the type's folders as the dead attempt left them, so training resumes from its
last checkpoint and generation from its last finished image. Exceptions inside a task are not retried:
`process_type` turns them into a failed result, as locally.

Ray is the optional extra `pip install 'defectfill[ray]'`; it is imported (`import_ray`) only for --executor ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from defectfill.config.stages import RunConfig
from defectfill.core.errors import DefectFillError
from defectfill.outputs.job_folder import job_folder
from defectfill.run.process import TypeResult, process_type, record_result, run_downstream

log = logging.getLogger("defectfill.run")

INSTALL = "pip install 'defectfill[ray]'"
# How long a task waits for its type's lock: on NFS the lock of a lost node's process lasts until the
# server's lease ends (about 90 s by default).
LOCK_WAIT_S = 180.0


def import_ray():
    """The `ray` module, or a DefectFillError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise DefectFillError(f"--executor ray needs Ray, which is not installed here: {INSTALL} "
                              "(on every node of the cluster), or use --executor local.") from None
    return ray


class RayExecutor:
    """A context manager: joins (or starts) Ray on entry, leaves a Ray it started on exit."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.ray = import_ray()
        self.started = False

    def __enter__(self) -> RayExecutor:
        ray = self.ray
        if not ray.is_initialized():  # a caller that already joined a cluster (a notebook, the tests) keeps it
            # "local": a new Ray on this machine, never a cluster found by chance
            address = self.config.ray_address or "local"
            try:
                if address == "local":
                    ray.init(address="local", include_dashboard=False)
                else:
                    ray.init(address=address)
            except Exception as exc:  # noqa: BLE001 - Ray raises plain Exception for a node that did not start
                if address == "local":
                    raise DefectFillError(f"--executor ray: could not start Ray on this machine ({exc}). See Ray's "
                                          "logs in /tmp/ray/session_latest/logs, or start a cluster with `ray start "
                                          "--head` and pass --ray-address auto.") from None
                raise DefectFillError(
                    f"--ray-address {address}: cannot join a Ray cluster there ({exc}). Start one with `ray start "
                    "--head` on the head node (and `ray start --address HEAD:6379` on the others), then pass "
                    "--ray-address auto on a node of it; or leave --ray-address out to start Ray on this machine."
                ) from None
            self.started = True
        self._check_gpus()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.started:
            self.ray.shutdown()

    def _check_gpus(self) -> None:
        wanted = self.config.gpus_per_task
        total = self.ray.cluster_resources().get("GPU", 0)
        if wanted <= total:
            return
        problem = f"--gpus-per-task {wanted:g}: the Ray cluster has {total:g} GPU(s)"
        if self.started and not self.config.ray_address:  # a Ray of this machine gets no GPU later
            raise DefectFillError(f"{problem} on this machine. Pass --gpus-per-task 0 to train on the CPUs, or "
                                  "--ray-address of a cluster with GPUs.")
        log.warning("%s; the tasks wait until nodes with GPUs join (an autoscaling cluster). Pass --gpus-per-task 0 "
                    "to run them on CPUs.", problem)

    def _options(self, name: str) -> dict[str, Any]:
        options: dict[str, Any] = {"name": name, "num_gpus": self.config.gpus_per_task,
                                   "max_retries": self.config.task_retries, "retry_exceptions": False}
        # settings given by environment (DEFECTFILL_COMPILE_BACKEND, ...) mean the same in a task as locally
        forwarded = {k: v for k, v in os.environ.items() if k.startswith("DEFECTFILL_")}
        if forwarded:
            options["runtime_env"] = {"env_vars": forwarded}
        return options

    def _gather(self, refs: dict[Any, Any], what: str) -> dict[Any, Any]:
        """Each task's return value by its key, as the tasks finish; a task Ray gave up on -> its exception."""
        ray = self.ray
        pending, out = list(refs.values()), {}
        keys = {ref: key for key, ref in refs.items()}
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    out[keys[ref]] = ray.get(ref)
                except ray.exceptions.RayError as exc:  # worker or node lost after every retry, or unschedulable
                    out[keys[ref]] = exc
                label = "/".join(keys[ref]) if isinstance(keys[ref], tuple) else keys[ref]
                print(f"[{len(out)}/{len(refs)}] {what} {label}: finished")
        return out

    def types(self, config: RunConfig, pairs: list[tuple[str, str]],
              evaluate_kwargs: dict[str, Any]) -> list[TypeResult]:
        ray = self.ray
        task = ray.remote(_type_task)
        shared_kwargs = ray.put(evaluate_kwargs)  # the stand-in networks once, not once per task
        cwd = os.getcwd()
        refs = {
            (cat, t): task.options(**self._options(f"defectfill {cat}/{t}")).remote(
                cat, t, config, f"[{i + 1}/{len(pairs)}]", shared_kwargs, cwd)
            for i, (cat, t) in enumerate(pairs)
        }
        finished = self._gather(refs, "defect type")
        results = []
        for cat, t in pairs:
            result = finished[(cat, t)]
            if isinstance(result, BaseException):
                # a task whose worker died was retried --task-retries times first; an exception is not retried
                result = TypeResult(cat, t, status="failed", error=f"ray: {type(result).__name__}: {_first_line(result)}")
                record_result(config, result)  # the task could not: its process is gone
            results.append(result)
        return results

    def downstream(self, config: RunConfig, categories: list[str], synth: Path, note: str | None) -> dict[str, str]:
        task = self.ray.remote(_downstream_task)
        refs = {cat: task.options(**self._options(f"defectfill downstream {cat}")).remote(
            config, cat, synth, note, os.getcwd()) for cat in categories}
        finished = self._gather(refs, "downstream of")
        return {cat: (f"failed: ray: {type(v).__name__}: {_first_line(v)}" if isinstance(v, BaseException) else v)
                for cat, v in finished.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- in the Ray worker


def _type_task(cat: str, defect_type: str, config: RunConfig, position: str, evaluate_kwargs: dict[str, Any],
               cwd: str) -> TypeResult:
    """One defect type in a Ray worker: the local executor's `process_type`, logging to the run's run.log."""
    with _in_folder(cwd), _worker_log(config):
        return process_type(cat, defect_type, config, position, evaluate_kwargs, lock_wait_s=LOCK_WAIT_S)


def _downstream_task(config: RunConfig, cat: str, synth: Path, note: str | None, cwd: str) -> str:
    with _in_folder(cwd), _worker_log(config):
        return run_downstream(config, cat, synth, note)


@contextlib.contextmanager
def _in_folder(cwd: str) -> Iterator[None]:
    """Relative paths of the settings mean what they meant where `defectfill run` was started (on shared storage)."""
    before = os.getcwd()
    if os.path.isdir(cwd):
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _worker_log(config: RunConfig) -> Iterator[None]:
    logger = logging.getLogger("defectfill")
    level = logger.level
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(job_folder(config).log)  # appended to by every task
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [pid {os.getpid()}] %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)
