"""The built wheel works on its own: built offline from the sources, installed into a fresh virtual
environment, and run from a directory outside the checkout (the profiles and model configs are package
data, not files next to the checkout)."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _copy_sources(dst: Path) -> None:
    """pyproject's packages and the files it names, without caches or build outputs, so that building
    leaves the checkout as it was."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dst.mkdir()
    for name in ("pyproject.toml", meta["project"]["readme"], *meta["project"]["license-files"]):
        shutil.copy2(ROOT / name, dst / name)
    for pkg in meta["tool"]["setuptools"]["packages"]:
        if "." in pkg:                # a subpackage: copied with its parent
            continue
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """(venv bin directory, a working directory outside the checkout) with the wheel installed."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    _copy_sources(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(base / "dist"), str(src)], check=True, capture_output=True, text=True)
    wheels = list((base / "dist").glob("moe_lightning-*.whl"))
    assert len(wheels) == 1
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheels[0])],
                   check=True, capture_output=True, text=True)
    work = base / "elsewhere"
    work.mkdir()
    return venv / "bin", work


def _run(installed, *args, check=True):
    bindir, work = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOE_LIGHTNING_PROFILES")}
    env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([str(bindir / args[0]), *args[1:]], cwd=work, env=env, capture_output=True, text=True,
                       timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


pytestmark = pytest.mark.slow


def test_the_wheel_is_what_runs(installed):
    """The venv imports the installed copy, not the checkout (whose editable finder is on the system path)."""
    out = _run(installed, "python", "-c", "import hrm, moe_lightning_cli, runtime.probe; print(hrm.__file__)").stdout
    assert Path(out.strip()).is_relative_to(installed[0].parent)
    assert not Path(out.strip()).is_relative_to(ROOT)


def test_version_and_license(installed):
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert _run(installed, "moe-lightning", "--version").stdout.split() == ["moe-lightning", meta["project"]["version"]]
    lic = _run(installed, "python", "-c",
               "from importlib.metadata import distribution as d; print(d('moe-lightning').read_text('licenses/LICENSE'))")
    assert "Apache License" in lic.stdout and "Version 2.0" in lic.stdout


@pytest.mark.parametrize("extra", [[], ["--hardware", "h200"]])
def test_plan_from_the_wheel(installed, extra):
    r = _run(installed, "moe-lightning", "plan", "--json", "--no-baselines", *extra)
    plan = json.loads(r.stdout)["plan"]
    assert plan["hardware"]["name"] == (extra[1] if extra else "t4-s1")
    assert plan["model"]["spec"]["name"] == "mixtral-8x7b"
    assert plan["estimate"]["throughput_tok_s"] > 0


def test_default_job_prints_its_table_from_the_wheel(installed):
    out = _run(installed, "moe-lightning").stdout
    assert "mixtral-8x7b" in out and "t4-s1" in out and "chosen policy" in out


def test_unknown_profile_lists_the_packaged_ones(installed):
    r = _run(installed, "moe-lightning", "plan", "--hardware", "nowhere", check=False)
    assert r.returncode == 2
    assert "t4-s1" in r.stderr and "h200" in r.stderr


def test_generate_from_the_wheel(installed, tmp_path):
    """A tiny checkpoint with a real tokenizer, through the installed console script; its output equals
    the checkout's."""
    import tiny_text_model
    from moe_lightning_cli.main import main

    model = tiny_text_model.build(tmp_path / "model")
    reqs = tmp_path / "in.jsonl"
    reqs.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(tiny_text_model.PROMPTS)))
    _run(installed, "moe-lightning", "generate", "--model", str(model), "-i", str(reqs), "-o", "out.jsonl",
         "--max-tokens", "5", "-q")
    assert main(["generate", "--model", str(model), "-i", str(reqs), "-o", str(tmp_path / "here.jsonl"),
                 "--max-tokens", "5", "-q"]) == 0
    out = (installed[1] / "out.jsonl").read_text()
    assert len(out.splitlines()) == len(tiny_text_model.PROMPTS)
    assert out == (tmp_path / "here.jsonl").read_text()


def test_every_package_is_listed():
    """Each directory with an __init__.py under the listed packages is itself listed (a wheel holds only those)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for root in listed if "." not in root
             for p in (ROOT / root).rglob("__init__.py")}
    assert found == listed


def test_notebooks_run_from_the_wheel(installed):
    """The notebooks, copied outside the checkout, run top to bottom against the installed package."""
    bindir, work = installed
    nb_dir = work / "notebooks"
    shutil.copytree(ROOT / "notebooks", nb_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    r = _run(installed, "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake",
             *sorted(str(p) for p in nb_dir.glob("*.ipynb")), check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
