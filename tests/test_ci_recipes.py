"""docs/ci.md's recipes run as written, so that they cannot rot again.

Each recipe is taken from its ```yaml block and run in a scratch user repository that
holds a ``models/`` folder (copies of bundled models, ``models/net.onnx`` among them):
the GitHub Actions ``run:`` steps each in ``bash -eo pipefail`` (GitHub's shell), the
GitLab ``script:`` lines in one ``bash -eo pipefail`` (what its runner does), the
pre-commit hook as pre-commit calls it (its entry with the staged files its ``files``
pattern matches, from a real git index). The one line replaced is the recipe's
``pip install``: there the bnfold under test is on ``PATH`` (no network here).
Then what the recipe promises is checked: its exit status, the files it names (the
JUnit reports a CI server reads, the artifacts), and that a model that is not ready
stops it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CI_DOC = ROOT / "docs" / "ci.md"
READY = ["cnn_ts13", "resnet_dynamo18", "mlp_ts13"]


def recipe(heading: str):
    """The parsed ```yaml block under a docs/ci.md heading."""
    text = CI_DOC.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return yaml.safe_load(block)


def without_install(script: str) -> str:
    """The script with its one `pip install` line (bnfold from this repository) removed."""
    lines = script.splitlines()
    installs = [i for i, line in enumerate(lines) if line.strip().startswith("pip install")]
    assert len(installs) == 1 and "bnfold[cpu]" in lines[installs[0]], script
    return "\n".join(line for i, line in enumerate(lines) if i != installs[0]) + "\n"


@pytest.fixture
def repo(tmp_path):
    """A user's repository: models/ with ready models (net.onnx is the default CNN), git
    initialised, and a bin/ holding a `bnfold` that runs this tree's bnfold."""
    user = tmp_path / "repo"
    (user / "models").mkdir(parents=True)
    for name in READY:
        shutil.copy(ROOT / "models" / f"{name}.onnx", user / "models" / f"{name}.onnx")
    shutil.copy(ROOT / "models" / "cnn_ts13.onnx", user / "models" / "net.onnx")
    bnfold_on_path(tmp_path)
    return user


def bnfold_on_path(tmp_path: Path) -> None:
    """``tmp_path/bin/bnfold``, which `shell` puts first on PATH: this tree's bnfold."""
    tools = tmp_path / "bin"
    tools.mkdir()
    shim = tools / "bnfold"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bnfold "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)


def shell(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{cwd.parent / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def failures(path: Path) -> int:
    return int(ET.parse(path).getroot().get("failures"))


def github_steps():
    steps = recipe("GitHub Actions")
    return [step["run"] for step in steps if "run" in step], steps


def test_github_actions_recipe_runs_as_written(repo):
    runs, steps = github_steps()
    assert [s.get("uses", "").split("@")[0] for s in steps if "uses" in s] == ["actions/checkout",
                                                                               "mikepenz/action-junit-report"]
    (script,) = runs
    done = shell(without_install(script), repo)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (repo / "dist" / "net.onnx").is_file()
    fold = json.loads((repo / "fold.json").read_text())
    assert fold["verdict"] == "PASS" and fold["summary"]["folded"] == 5
    assert json.loads((repo / "verify.json").read_text())["verdict"] == "PASS"
    assert json.loads((repo / "inspect.json").read_text())["exit_code"] == 0
    report = next(s for s in steps if s.get("uses", "").startswith("mikepenz/"))
    assert report["if"] == "always()"
    xml = sorted(p.name for p in repo.glob(report["with"]["report_paths"]))
    assert xml == ["fold.xml", "inspect.xml"] and all(failures(repo / name) == 0 for name in xml)


def test_github_actions_recipe_stops_on_a_model_that_is_not_ready(repo):
    """An untrained BN fails inspect: the step ends there (exit 1), before the fold, and
    the JUnit report the always() step uploads says which BN failed."""
    shutil.copy(ROOT / "models" / "cnn-nostats_ts17.onnx", repo / "models" / "fresh.onnx")
    (script,) = github_steps()[0]
    done = shell(without_install(script), repo)
    assert done.returncode == 1, done.stdout + done.stderr
    assert failures(repo / "inspect.xml") == 5 and not (repo / "dist" / "net.onnx").exists()
    assert "bnfold: FAIL: 5 of 5 BatchNormalization not inference-ready (untrained-stats) in models/fresh.onnx" \
        in done.stdout


def test_gitlab_recipe_runs_as_written(repo):
    (job,) = recipe("GitLab CI").values()
    done = shell(without_install("\n".join(job["script"])), repo)
    assert done.returncode == 0, done.stdout + done.stderr
    artifacts = job["artifacts"]
    assert artifacts["when"] == "always"
    for name in artifacts["reports"]["junit"]:
        assert failures(repo / name) == 0, name
    for path in artifacts["paths"]:
        assert (repo / path).exists(), path
    assert (repo / "dist" / "net.onnx").is_file()


def test_the_pre_commit_recipe_runs_the_shipped_hook_on_staged_models(repo):
    """The config names the shipped hook; pre-commit runs its entry with the staged
    files its pattern matches: a ready model passes, an untrained one fails in one line."""
    (config_repo,) = recipe("pre-commit")["repos"]
    (hook_ref,) = config_repo["hooks"]
    hooks = {h["id"]: h for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}
    hook = hooks[hook_ref["id"]]
    assert hook["language"] == "python" and hook["pass_filenames"] is True

    def commit_hook() -> subprocess.CompletedProcess:
        staged = shell("git diff --cached --name-only", repo).stdout.split()
        matched = [f for f in staged if re.search(hook["files"], f)]
        assert matched, staged
        return shell(f"{hook['entry']} {' '.join(matched)}", repo)

    assert shell("git init -q && git add models", repo).returncode == 0
    (repo / "README").write_text("not a model\n")
    shell("git add README", repo)
    done = commit_hook()
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    shutil.copy(ROOT / "models" / "cnn-nostats_ts17.onnx", repo / "models" / "fresh.onnx")
    shell("git add models/fresh.onnx", repo)
    done = commit_hook()
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == ["bnfold: FAIL: 5 of 5 BatchNormalization not inference-ready "
                                        "(untrained-stats) in models/fresh.onnx"]


def test_output_folders_are_created_by_out_dir_only(repo):
    """docs/ci.md: -o and report paths need an existing folder (exit 2, nothing left
    behind); --out-dir creates its folder tree."""
    done = shell("bnfold fold models/net.onnx -o dist/net.onnx", repo)
    assert done.returncode == 2 and done.stderr == ("bnfold: error: dist/net.onnx: the output's folder dist does not "
                                                    "exist (bnfold creates no folder but --out-dir)\n")
    assert not (repo / "dist").exists()
    done = shell("bnfold fold models/net.onnx -o net.onnx --json reports/fold.json", repo)
    assert done.returncode == 2 and not (repo / "reports").exists() and not (repo / "net.onnx").exists()
    done = shell("bnfold fold models --out-dir dist/a/b -q", repo)
    assert done.returncode == 0 and (repo / "dist" / "a" / "b" / "net.onnx").is_file()


def test_the_verify_docs_recipe_runs_in_this_repository(tmp_path):
    """docs/verify.md's job runs in a checkout of bnfold itself (its install line is this
    repository's `pip install '.[cpu]'`): its fold-and-verify step as written."""
    text = (ROOT / "docs" / "verify.md").read_text().split("## CI recipe\n", 1)[1]
    (block,) = re.findall(r"```yaml\n(.*?)```", text.split("\n## ", 1)[0], re.S)
    steps = yaml.safe_load(block)["jobs"]["fold"]["steps"]
    runs = [step["run"] for step in steps if "run" in step]
    assert runs[0].strip() == "pip install '.[cpu]'"
    checkout = tmp_path / "bnfold"
    (checkout / "models").mkdir(parents=True)
    for name in ("cnn_ts13.onnx", "cnn_ts13.npz"):
        shutil.copy(ROOT / "models" / name, checkout / "models" / name)
    bnfold_on_path(tmp_path)
    for script in runs[1:]:
        done = shell(script, checkout)
        assert done.returncode == 0, done.stdout + done.stderr
    published = [step["with"]["path"] for step in steps if step.get("uses", "").startswith("actions/upload-artifact")]
    assert all((checkout / path).is_file() for path in published), published
    assert json.loads((checkout / "verify.json").read_text())["verdict"] == "PASS"
