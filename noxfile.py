"""Every developer and CI entry point. `nox` alone runs lint, tests and isolated (see docs/testing.md).

- ``tests``: every package editable in one environment; the whole suite, once, on XDIST_WORKERS
  processes (tests marked ``serial`` share one of them), the 20 slowest tests printed.
- ``isolated``: each package installed alone (with ds-core) in a fresh environment, running only its
  ``smoke`` tests: it installs, imports, its entry points resolve, one real multi-rank run works.
  That proves the packages independent; the full suite already ran once in ``tests``.

Torch: every pip line that can pull torch pins ``torch==2.13.0`` (an unpinned torch pulls gigabytes of
CUDA wheels). It is installed once per machine into ``.nox/_shared/torch-2.13.0`` and put on each
environment's path with a ``.pth`` file; the pin on the later lines finds it there. Torch is not one
of ours, so sharing it keeps every independence proof and spares a torch install per environment.

To add a package: one line in PACKAGES (and EXTRAS if the tests need an extra). A test dependency:
one line in TEST_DEPS. Nothing else changes.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "isolated"]
nox.options.reuse_existing_virtualenvs = False

TORCH = "torch==2.13.0"
PACKAGES = [
    "ds-core",
    "ds-ops",
    "ds-zero",
    "ds-pipe",
    "ds-moe",
    "ds-parallel",
    "ds-infer",
    "ds-compress",
]
# Optional extras exercised by the tests: Triton kernels run on CPU under TRITON_INTERPRET=1.
EXTRAS = {
    "ds-ops": "[cuda,bnb]",
    "ds-infer": "[hf,serve]",
    "ds-parallel": "[hf]",
    "ds-core": "[lightning,transformers,accelerate]",  # the framework integrations (tests/ds_core/integrations)
}
TEST_PLUGIN = "tests/ds_core/plugins/ds-test-accel"
TEST_DEPS = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "numpy",
    "tensorboard",  # the monitors' optional backends
    "wandb",
    "openai",  # the official client against `ds serve` (tests/ds_infer/serving)
    "transformers",  # Hugging Face models under ZeRO-3 (tests/ds_zero/test_stage3_hf.py)
    "deepspeed==0.19.8",  # writes the checkpoints tests/ds_core/convert converts (pure Python; ~10 s to install)
    "tests/ds_core/plugins/ds-test-strategy",  # a third-party data-parallel strategy (tests/ds_core)
]
XDIST_WORKERS = 2  # this many test processes; every multi-rank test starts its own ranks besides
PYTEST = ["--durations=20"]


def _shared_torch(session: nox.Session) -> None:
    """Put the machine's one torch install on this environment's path (installing it the first time)."""
    env = Path(session.virtualenv.location)
    shared = env.parent / "_shared" / TORCH.replace("==", "-")
    shared.parent.mkdir(parents=True, exist_ok=True)
    with open(shared.parent / ".lock", "w") as lock:  # two nox runs at once install it once
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not (shared / ".complete").exists():
            partial = shared.with_name(shared.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            session.run("python", "-m", "pip", "install", "--quiet", "--target", str(partial), TORCH)
            (partial / ".complete").touch()
            shutil.rmtree(shared, ignore_errors=True)
            os.replace(partial, shared)
    site = session.run("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                       silent=True).strip().splitlines()[-1]
    (Path(site) / "_shared_torch.pth").write_text(f"{shared.resolve()}\n")


def _install_all(session: nox.Session, editable: bool = True, extras: bool = True) -> None:
    _shared_torch(session)
    flag = ["-e"] if editable else []
    args: list[str] = []
    for package in PACKAGES:
        args += [*flag, f"packages/{package}{EXTRAS.get(package, '') if extras else ''}"]
    session.install(TORCH, *args)


@nox.session
def tests(session: nox.Session) -> None:
    """All packages editable in one environment; the whole suite, once."""
    _install_all(session)
    session.install(TORCH, *TEST_DEPS, TEST_PLUGIN)
    workers = ["-n", str(XDIST_WORKERS), "--dist", "loadgroup"] if XDIST_WORKERS > 1 else []
    session.run("pytest", "tests", *workers, *PYTEST, *session.posargs,
                env={"OMP_NUM_THREADS": "1"})  # XDIST_WORKERS processes share the cores


@nox.session
@nox.parametrize("package", PACKAGES)
def isolated(session: nox.Session, package: str) -> None:
    """One package (and ds-core) alone in a fresh environment, running its smoke tests."""
    _shared_torch(session)
    session.install(TORCH, "packages/ds-core", *(["packages/ds-parallel"] if package == "ds-infer" else []))
    if package != "ds-core":
        session.install(TORCH, f"packages/{package}{EXTRAS.get(package, '')}")
    session.install(TORCH, *TEST_DEPS)
    if package == "ds-core":
        session.install(TORCH, TEST_PLUGIN)
    tests_dir = f"tests/{package.replace('-', '_')}"
    # exit code 5 (no smoke test collected) fails the session like any failure
    session.run("pytest", tests_dir, "-m", "smoke", *PYTEST, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.17,<0.18")  # lint rules change between minor versions
    session.run("ruff", "check", "packages", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("python", "tools/check_imports.py")  # no import cycles, no sibling imports


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: train a small GPT on 2 CPU ranks."""
    _install_all(session, extras=False)
    session.run("python", "-m", "ds_core", "run", "--nproc", "2", "examples/train_gpt.py",
                "--config", "examples/configs/gpt_cpu.json", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark script; each prints our figure, the baseline's, and the ratio."""
    _install_all(session)
    session.install(TORCH, "numpy", "deepspeed==0.19.8")  # DeepSpeed: the optional baseline (benchmarks/_deepspeed.py)
    scripts = session.posargs or sorted(glob.glob("benchmarks/bench_*.py"))
    for script in scripts:
        session.run("python", script)


@nox.session
def gpu(session: nox.Session) -> None:
    """The GPU proof, benchmarks/gpu/run.py: the tests marked ``cuda``, every Triton kernel compiled and
    checked, the GPU benchmarks, results in runs/gpu/. Without a CUDA device it is a dry run (tiny
    models on the CPU, the cuda tests skipped with their reason) that exits 0. On a GPU machine with
    no network, run the script with the machine's own torch instead (see docs/gpu.md)."""
    _install_all(session)
    session.install(TORCH, *TEST_DEPS, TEST_PLUGIN)
    session.run("python", "benchmarks/gpu/run.py", *session.posargs)
