"""Every developer and CI entry point. `nox` alone runs lint, tests and isolated.

Each session installs torch==2.13.0 first: an unpinned torch would pull gigabytes of CUDA wheels.
"""

from __future__ import annotations

import glob

import nox

nox.options.sessions = ["lint", "tests", "isolated"]
nox.options.reuse_existing_virtualenvs = False

TORCH = "torch==2.13.0"
PACKAGES = ["ds-core", "ds-ops", "ds-zero", "ds-pipe", "ds-moe", "ds-parallel", "ds-infer", "ds-compress"]
TEST_PLUGIN = "tests/ds_core/plugins/ds-test-accel"
TEST_DEPS = ["pytest>=8", "numpy", "tensorboard", "wandb"]  # the monitors' optional backends
# Optional extras exercised by the tests: Triton kernels run on CPU under TRITON_INTERPRET=1.
EXTRAS = {"ds-ops": "[cuda,bnb]", "ds-parallel": "[hf]"}


def _install_all(session: nox.Session, editable: bool = True, extras: bool = True) -> None:
    session.install(TORCH)
    flag = ["-e"] if editable else []
    args: list[str] = []
    for package in PACKAGES:
        args += [*flag, f"packages/{package}{EXTRAS.get(package, '') if extras else ''}"]
    session.install(*args)


@nox.session
def tests(session: nox.Session) -> None:
    """All packages editable in one environment; the whole suite."""
    _install_all(session)
    session.install(*TEST_DEPS, TEST_PLUGIN)
    session.run("pytest", "tests", *session.posargs)


@nox.session
@nox.parametrize("package", PACKAGES)
def isolated(session: nox.Session, package: str) -> None:
    """One package (and ds-core) alone in a fresh environment, running its own tests."""
    session.install(TORCH)
    session.install("packages/ds-core")
    if package != "ds-core":
        session.install(f"packages/{package}{EXTRAS.get(package, '')}")
    session.install(*TEST_DEPS)
    if package == "ds-core":
        session.install(TEST_PLUGIN)
    tests_dir = f"tests/{package.replace('-', '_')}"
    session.run("pytest", tests_dir, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.17,<0.18")  # lint rules change between minor versions
    session.run("ruff", "check", "packages", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: train a small GPT on 2 CPU ranks."""
    _install_all(session, extras=False)
    session.run("ds", "run", "--nproc", "2", "examples/train_gpt.py",
                "--config", "examples/configs/gpt_cpu.json", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark script; each prints our figure, the baseline's, and the ratio."""
    _install_all(session)
    session.install("numpy")
    scripts = session.posargs or sorted(glob.glob("benchmarks/bench_*.py"))
    for script in scripts:
        session.run("python", script)
