"""`defectfill run` over many processes: --executor ray on a real local Ray, --shard I/N and --report-only.

One local whole run (module fixture) is the reference: the Ray run, and two shards plus --report-only,
must write the same files, manifests, run settings and report rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_with_stand_ins, tiny_run_config

from defectfill.cli import main
from defectfill.config.stages import RunConfig
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import folder_lock
from defectfill.run.runner import shard_pairs

ROOT = Path(__file__).resolve().parents[1]


def _config(demo_root, tiny_model_dir, output, **overrides) -> RunConfig:
    return tiny_run_config(demo_root, tiny_model_dir, output, **{"mixed_precision": "no", **overrides})


def _run_all(config: RunConfig):
    return run_with_stand_ins(config)


def _outputs(folder: Path) -> dict[str, object]:
    """What a run folder holds that must not depend on how it was run: the file names (TensorBoard's, which
    carry host and time, by folder), the generated images' bytes, the manifests, the run settings and the
    report's rows."""
    def read(p: Path) -> str:  # the folder's own path, recorded in settings and manifests, made neutral
        return p.read_text().replace(str(folder), "<output>")

    names = set()
    for p in folder.rglob("*"):
        if p.is_file() and p.name != "run.log":
            rel = p.relative_to(folder)
            names.add(str(rel.parent / "<events>") if "tfevents" in p.name else str(rel))
    out: dict[str, object] = {"files": sorted(names)}
    for p in sorted(folder.glob("generated/*/**/*.png")):
        out[str(p.relative_to(folder))] = p.read_bytes()
    for p in sorted(folder.glob("generated/*/manifest.jsonl")):
        rows = [json.loads(line) for line in read(p).splitlines()]
        for row in rows:  # when each row was written differs by design; what wrote it must not
            row.get("provenance", {}).pop("created_utc", None)
        out[str(p.relative_to(folder))] = rows
    for p in sorted(folder.glob("runs/*/config.json")):
        out[str(p.relative_to(folder))] = json.loads(read(p))
    out["run.json"] = json.loads(read(folder / "run.json"))
    out["report.md"] = read(folder / "report.md")
    out["results"] = json.loads(read(folder / "summary.json"))["results"]
    return out


def _one_thread():
    """One torch thread, as each 1-CPU Ray task has, so the floating-point sums are the same everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


@pytest.fixture
def one_thread():
    threads = _one_thread()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_run(demo_root, tiny_model_dir, tmp_path_factory):
    """The reference: a whole local run of disc (scratch, spot)."""
    threads = _one_thread()
    try:
        output = tmp_path_factory.mktemp("local") / "work"
        results = _run_all(_config(demo_root, tiny_model_dir, output))
    finally:
        torch.set_num_threads(threads)
    assert [r.status for r in results] == ["done", "done"]
    return output


# --------------------------------------------------------------------------- shards and --report-only


def test_two_shards_and_report_only_equal_one_whole_run(local_run, one_thread, demo_root, tiny_model_dir, tmp_path,
                                                        capsys):
    output = tmp_path / "work"
    first = _run_all(_config(demo_root, tiny_model_dir, output, shard="1/2"))
    assert [(r.defect_type, r.status) for r in first] == [("scratch", "done")]
    assert not (output / "report.html").exists(), "a shard wrote the report"
    assert "--report-only" in capsys.readouterr().out

    # a report before every shard has finished names the missing type, and the run's exit status says so
    argv = ["run", "--data", str(demo_root), "--model", str(tiny_model_dir), "--output", str(output),
            "--categories", "disc", "--report-only"]
    assert main(argv) == 1
    report = (output / "report.md").read_text()
    assert "| spot | missing: not run yet" in report and "| scratch | done |" in report

    second = _run_all(_config(demo_root, tiny_model_dir, output, shard="2/2"))
    assert [(r.defect_type, r.status) for r in second] == [("spot", "done")]
    assert main(argv) == 0
    assert _outputs(output) == _outputs(local_run)


def test_shards_are_disjoint_slices_that_cover_the_plan_in_any_order():
    plan = [(c, t) for c in ("b", "a", "c") for t in ("x", "z", "y")]
    for count in (1, 2, 3, 4, 10):
        slices = [shard_pairs(plan, (i, count)) for i in range(1, count + 1)]
        assert sorted(p for s in slices for p in s) == sorted(plan)  # every pair once
        assert slices == [shard_pairs(list(reversed(plan)), (i, count))[::-1] for i in range(1, count + 1)]
    assert shard_pairs(plan, None) == plan


def test_dry_run_of_a_shard_prints_its_slice(demo_root, tmp_path, capsys):
    assert main(["run", "--data", str(demo_root), "--categories", "all", "--output", str(tmp_path / "w"),
                 "--shard", "2/2", "--dry-run",
                 # offline, the pre-flight needs networks that are here: the built-in base, no KID/IC-LPIPS/AlexNet
                 "--model", "defectfill-mini", "--no-kid", "--no-ic-lpips", "--lpips-random-backbone"]) == 0
    out = capsys.readouterr().out
    # sorted plan: disc/scratch, disc/spot, weave/crack -> shard 2 of 2 holds disc/spot only
    assert "shard 2/2: 1 of the plan's 3 defect type(s)" in out and "disc/spot" in out
    assert "disc/scratch" not in out and "weave/crack" not in out


@pytest.mark.parametrize("settings, message", [
    ({"shard": "3/2"}, r"--shard 3/2: I must be between 1 and N"),
    ({"shard": "0/2"}, r"--shard 0/2: I must be between 1 and N"),
    ({"shard": "half"}, r"--shard 'half': expected I/N"),
    ({"shard": "1/2", "report_only": True}, r"--report-only .* without --shard"),
    ({"gpus_per_task": -1}, r"--gpus-per-task must be 0 or more \(got -1"),
    ({"ray_address": "auto"}, r"--ray-address auto: only used with --executor ray"),
    # the types of a category share one training: per-type tasks or shards would train it side by side
    ({"one_model_per_object": True, "executor": "ray"}, r"--one-model-per-object .* --executor local"),
    ({"one_model_per_object": True, "shard": "1/2"}, r"--one-model-per-object .* without --shard"),
])
def test_bad_distribution_settings_are_refused_with_the_flag(settings, message, tmp_path):
    with pytest.raises(DefectFillError, match=message):
        RunConfig.from_settings({"data": "d", "output": str(tmp_path / "w"), **settings})


def test_report_only_needs_a_run(demo_root, tmp_path, capsys):
    assert main(["run", "--data", str(demo_root), "--output", str(tmp_path / "none"), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "--report-only" in err and "run.json is missing" in err
    assert not (tmp_path / "none").exists()


def test_shards_share_the_run_lock_and_a_whole_run_or_report_excludes_them(tmp_path):
    with folder_lock(tmp_path, "run --shard 1/2", shared=True), folder_lock(tmp_path, "run --shard 2/2", shared=True):
        with pytest.raises(DefectFillError, match=r"another defectfill job is writing here \(defectfill run --shard"):
            with folder_lock(tmp_path, "run --report-only"):
                pass
    with folder_lock(tmp_path, "run"):
        with pytest.raises(DefectFillError, match="another defectfill job"):
            with folder_lock(tmp_path, "run --shard 1/2", shared=True):
                pass


# --------------------------------------------------------------------------- without Ray


def test_executor_ray_without_ray_names_the_extra(demo_root, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(DefectFillError, match=r"pip install 'defectfill\[ray\]'"):
        _run_all(_config(demo_root, tiny_model_dir, tmp_path / "w", executor="ray"))
    assert not (tmp_path / "w").exists(), "the folder was claimed before Ray was found missing"


def test_the_core_package_imports_and_parses_without_ray():
    # `import ray` raises in this process: the modules import (the Ray executor's too, which imports Ray only
    # when it starts) and `run --executor ray` parses
    code = ("import sys; sys.modules['ray'] = None\n"
            "import defectfill.cli, defectfill.run.runner, defectfill.run.ray_executor, defectfill.demo.job\n"
            "defectfill.cli.build_parser().parse_args(['run', '--data', 'd', '--output', 'o', '--executor', 'ray'])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


# --------------------------------------------------------------------------- a real local Ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU Ray on this machine for the module's tests. Its workers import the tests' helpers (the stand-in
    distance), so the tests folder goes on their PYTHONPATH."""
    if os.environ.get("CI") == "true":
        import ray  # CI installs the extra (scripts/setup.sh): a missing Ray fails there, never skips
    else:
        ray = pytest.importorskip("ray")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), str(ROOT), saved["PYTHONPATH"]) if p)
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers' torch threads: one, as the reference run's
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_ray_run_equals_the_local_run(ray_cluster, local_run, demo_root, tiny_model_dir, tmp_path):
    output = tmp_path / "work"
    results = _run_all(_config(demo_root, tiny_model_dir, output, executor="ray", gpus_per_task=0))
    assert [(r.defect_type, r.status) for r in results] == [("scratch", "done"), ("spot", "done")]
    assert _outputs(output) == _outputs(local_run)
    # every type ran in a Ray worker, not in this process
    log = (output / "run.log").read_text()
    assert "[pid " in log and f"[pid {os.getpid()}]" not in log


@pytest.fixture
def workers_killed_after_a_checkpoint(ray_cluster, tmp_path):
    """The module's Ray restarted with a fault in every worker it starts (`helpers.exit_after_first_checkpoint`,
    run by Ray's worker_process_setup_hook, `helpers.fault_in_every_worker`): the first attempt at training each type dies after its first
    checkpoint. Yields the markers folder; the plain Ray is back afterwards."""
    from helpers import fault_in_every_worker

    markers = tmp_path / "markers"
    markers.mkdir()
    ray = ray_cluster
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, runtime_env={
        "worker_process_setup_hook": fault_in_every_worker(str(markers))})
    try:
        yield markers
    finally:
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(workers_killed_after_a_checkpoint, demo_root,
                                                                     tiny_model_dir, tmp_path):
    markers = workers_killed_after_a_checkpoint
    output = tmp_path / "work"
    results = _run_all(_config(demo_root, tiny_model_dir, output, defect_types=["scratch"], steps=3,
                               executor="ray", gpus_per_task=0, task_retries=1))
    assert [(r.defect_type, r.status, r.stages["train"]) for r in results] == [("scratch", "done", "ran")]
    pid, step = map(int, (markers / "disc-scratch.pid").read_text().split())
    assert step == 1
    status = Path(f"/proc/{pid}/status")
    # the first attempt's process really ended (gone, or a zombie not yet reaped)
    assert not status.exists() or "State:\tZ" in status.read_text()
    train_log = (output / "runs" / "disc-scratch" / "train.log").read_text()
    # the retry went on from checkpoint-1 instead of training from the start again
    assert train_log.count("steps 0 -> 3") == 1 and train_log.count("steps 1 -> 3") == 1
    assert (output / "runs" / "disc-scratch" / "checkpoint-3").is_dir()
    assert json.loads((output / "summary.json").read_text())["results"][0]["status"] == "done"
