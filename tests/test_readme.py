"""The README's and docs/'s commands, read from their text, run (or dry-run) as a newcomer runs them.

- Fast: the README keeps its two commands; every relative link in README.md and docs/*.md resolves;
  every `python -m lapflow_jax.main` command in them names a real config file, real flags and real
  config fields; every `launch/*.sh` command of the Cloud TPU walk-through dry-runs with each of its
  `export` lines; every `python benchmarks/*.py`, `python -m lapflow_jax.<module>` and `pytest`
  command names a real script, module, flag or test.
- Slow: the README's first command runs verbatim with bash in a fresh copy of the working tree (its
  own venv and `pip install -e .`, relative workdir), leaves what the README says it leaves, and then
  each command of "Using it" runs from the README text in that environment, at a small size
  (`--config.` overrides appended).

Commands not run here, and why: `gcloud`, `tfds build`, `tensorboard`, `ssh-add` need a cloud
project, TensorFlow or a terminal; the launch scripts that call gcloud are dry-run here and run
against a fake gcloud in tests/test_launch.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
FIRST_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
    "python -m lapflow_jax.main --config=configs/demo.py --workdir=workdirs/demo"
)
MAIN = "lapflow_jax.main"


# --- reading commands out of markdown ---------------------------------------------------------


def section(text: str, heading: str) -> str:
    """The text under `heading` (e.g. "## Using it") up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.split("\n")
    try:
        start = lines.index(heading)
    except ValueError:
        raise AssertionError(f"no heading {heading!r}") from None
    end = next((i for i in range(start + 1, len(lines))
                if re.match(rf"#{{1,{level}}} ", lines[i]) and not _in_fence(lines, i)), len(lines))
    return "\n".join(lines[start + 1:end])


def _in_fence(lines: list[str], i: int) -> bool:
    return sum(line.startswith("```") for line in lines[:i]) % 2 == 1


def fenced_blocks(text: str, langs=("bash",)) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S) if m.group(1) in langs]


def commands(block: str) -> list[tuple[str, str]]:
    """(comment above it, command) per command of a bash block; backslash continuations joined,
    trailing `# ...` comments dropped."""
    result, comment, pending = [], "", ""
    for line in block.split("\n"):
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1].rstrip()
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            comment = stripped.lstrip("# ")
            continue
        words = shlex.split(stripped, comments=True)
        # Verbatim unless a trailing comment has to go.
        result.append((comment, stripped if words == _split_or_none(stripped) else shlex.join(words)))
    return result


def _split_or_none(line: str) -> list[str] | None:
    try:
        return shlex.split(line)
    except ValueError:  # an apostrophe in a trailing comment
        return None


def inline_commands(text: str) -> list[str]:
    """`python ...`, `pytest ...` and `launch/...` spans in running text (outside fenced blocks)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return [c for c in re.findall(r"`([^`\n]+)`", prose) if re.match(r"(python |pytest |launch/\S+\.sh\b)", c)]


@functools.cache
def all_commands() -> list[tuple[Path, str]]:
    """Every command in a bash block or an inline code span of README.md or docs/*.md, with its file."""
    found = []
    for path in [README, *DOCS]:
        text = path.read_text()
        for block in fenced_blocks(text):
            found += [(path, command) for _, command in commands(block)]
        found += [(path, command) for command in inline_commands(text)]
    return found


def using_it() -> list[tuple[str, str]]:
    blocks = fenced_blocks(section(README.read_text(), "## Using it"))
    assert len(blocks) == 1, "README's 'Using it' must hold one bash block of commands"
    return commands(blocks[0])


def kind(comment: str, command: str) -> str:
    words = shlex.split(command)
    if "misspelt" in comment.lower():
        return "misspelt"
    for mode in ("sample", "eval", "upsample"):
        if f"--mode={mode}" in words:
            return mode
    if any(w.startswith("--config.") for w in words):
        return "override"
    return "train"


def main_args(words: list[str]) -> list[str] | None:
    """The arguments of `python -m lapflow_jax.main ...` (or of what launch/train.sh passes after
    `--` with CONFIG=...), else None."""
    if words[:3] == ["python", "-m", MAIN]:
        return words[3:]
    if words[0] == "launch/train.sh":
        config = [w.split("=", 1)[1] for w in words if w.startswith("CONFIG=")]
        after = words[words.index("--") + 1:] if "--" in words else []
        return [f"--config={c}" for c in config] + after
    return None


# --- fast checks of the text ----------------------------------------------------------------


def test_readme_keeps_its_two_commands_and_links_the_docs():
    two = section(README.read_text(), "## The two commands")
    blocks = [b.strip() for b in fenced_blocks(two)]
    assert blocks == [FIRST_COMMAND, "bash tests/install_and_test.sh"]
    text = README.read_text()
    for path in DOCS:
        assert f"](docs/{path.name})" in text, f"README does not link docs/{path.name}"
    assert "](docs/demo_samples.png)" in section(text, "## Demo")
    assert "](docs/demo_upsample.png)" in section(text, "## Demo")  # the upsample command's grid


def test_license_and_method_page_are_in_the_repository_and_nothing_cites_outside_it():
    """Apache-2.0 in full; docs/method.md is the method page everything cites (no ../shared/ path)."""
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and len(license_text.splitlines()) > 190
    assert "## 1. The pyramid" in (REPO / "docs" / "method.md").read_text()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    cites = []
    for name in tracked:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".sh", ".ipynb", ".yaml", ".txt", ".cfg", ".toml") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for bad in ("shared/LAPFLOW", "LAPFLOW.md"):
            if bad in text and path.name != "test_readme.py":
                cites.append(f"{name}: {bad}")
    assert not cites, cites


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", [README, *DOCS, REPO / "launch" / "README.md", REPO / "benchmarks" / "README.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    text = path.read_text()
    text_no_code = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text_no_code):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", resolved.read_text(), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{path.name}: broken links {broken}"


def _config_fields(config_path: str) -> set[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_readme_config", REPO / config_path)
    module = importlib.util.module_from_spec(spec)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    spec.loader.exec_module(module)
    config = module.get_config()
    fields = set()

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            fields.add(name)
            if hasattr(value, "items"):
                walk(value, name + ".")

    walk(config, "")
    return fields


@functools.cache
def _help(module: str) -> str:
    """`python -m module --help` (absl or argparse)."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.strip(), f"{module} --help: {proc.stderr[-2000:]}"  # absl's --help exits 1
    return proc.stdout


def _flag_names(help_text: str) -> set[str]:
    """The flags a --help text defines (absl's `  --[no]name:` lines, argparse's `  -h, --name X`)."""
    return set(re.findall(r"^\s+(?:-\w, )?--(?:\[no\])?([A-Za-z][\w-]*)", help_text, re.M))


def test_every_documented_main_command_names_real_flags_and_config_fields():
    checked = 0
    misspelt = [c for k, c in ((kind(*kc), kc[1]) for kc in using_it()) if k == "misspelt"]
    flags = _flag_names(_help(MAIN))
    assert {"config", "workdir", "mode"} <= flags, flags
    problems = []
    for path, command in all_commands():
        args = main_args(shlex.split(command))
        if args is None or command in misspelt:
            continue
        configs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
        if not configs or "<" in configs[0]:
            continue  # a placeholder (configs/<name>.py)
        assert (REPO / configs[0]).is_file(), f"{path.name}: {configs[0]} does not exist ({command})"
        fields = _config_fields(configs[0])
        for arg in args:
            name = arg.split("=", 1)[0].removeprefix("--")
            if name.startswith("config."):
                if name.removeprefix("config.") not in fields:
                    problems.append(f"{path.name}: config field {name} ({command})")
            elif arg.startswith("--") and name not in flags:
                problems.append(f"{path.name}: flag --{name} ({command})")
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 8, f"only {checked} commands found: the parser lost them"
    # The check can fail: the README's misspelt field is not a field.
    (bad,) = misspelt
    names = [a.split("=", 1)[0].removeprefix("--config.") for a in shlex.split(bad) if a.startswith("--config.")]
    assert names and not set(names) <= _config_fields("configs/demo.py")


def test_every_documented_module_benchmark_and_pytest_command_exists():
    checked = 0
    for path, command in all_commands():
        words = shlex.split(command)
        if words[:2] == ["python", "-m"] and words[2].startswith("lapflow_jax.") and words[2] != MAIN:
            flags = _flag_names(_help(words[2]))
            used = {w.split("=", 1)[0][2:] for w in words[3:] if w.startswith("--")}
            overrides = {u.removeprefix("config.") for u in used if u.startswith("config.")}
            assert used - {f"config.{o}" for o in overrides} <= flags, \
                f"{path.name}: {command}: unknown flags {used - flags}"
            configs = [w.split("=", 1)[1] for w in words if w.startswith("--config=")]
            if overrides:  # --config.<field> must name a field of the config the command uses
                assert configs and overrides <= _config_fields(configs[0]), f"{path.name}: {command}"
            checked += 1
        elif words[0] == "python" and words[1].startswith("benchmarks/"):
            script = REPO / words[1]
            assert script.is_file(), f"{path.name}: {command}"
            proc = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            for flag in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
                assert re.search(rf"{re.escape(flag)}\b", proc.stdout), f"{path.name}: {command}: no {flag}"
            checked += 1
        elif words[0] == "pytest":
            proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *words[1:]],
                                  cwd=REPO, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0 and "::" in proc.stdout, f"{path.name}: {command}\n{proc.stdout[-2000:]}"
            checked += 1
    assert checked >= 5, checked


def _doc_commands(path: Path, prefix: str) -> list[str]:
    return [c for p, c in all_commands() if p == path and c.startswith(prefix)]


def test_cloud_tpu_walkthrough_launch_commands_dry_run(tmp_path):
    """Each `launch/*.sh` command of docs/cloud_tpu.md, with each slice's `export` line, dry-runs."""
    page = REPO / "docs" / "cloud_tpu.md"
    exports = _doc_commands(page, "export ")
    launches = _doc_commands(page, "launch/")
    assert len(exports) >= 3 and len(launches) >= 4, (exports, launches)
    for export in exports:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "LC_ALL": "C"}
        env.update(w.split("=", 1) for w in shlex.split(export)[1:])
        for command in launches:
            words = shlex.split(command)
            proc = subprocess.run(["bash", str(REPO / words[0]), "--dry-run", *words[1:]], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, f"{export}\n{command}\n{proc.stderr[-2000:]}"
            assert re.search(r"^gcloud ", proc.stdout, re.M), f"{command}: printed no gcloud command"


# --- the README's commands, run ---------------------------------------------------------------


def fresh_copy(dest: Path) -> Path:
    """The working tree's files as git sees them (tracked, and untracked but not ignored), so
    uncommitted changes are included and build outputs, venvs and workdirs are not."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def newcomer_env() -> dict[str, str]:
    """This process's environment without its venv or the test suite's JAX settings (conftest asks
    for 8 fake CPU devices), as a new user's shell would be; pip keeps its cache."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH", "PIP_NO_CACHE_DIR")}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def run_bash(command: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=newcomer_env(), capture_output=True,
                          text=True, timeout=timeout)


def _leaves(paragraph: str) -> list[str]:
    """The workdir-relative paths a README paragraph names in backticks (`checkpoints/`, `x.png`)."""
    return [p for p in re.findall(r"`([^`\s]+)`", paragraph)
            if re.search(r"/$|\.(png|jsonl|json|npz)$", p) and not p.startswith(("workdirs/", "gs://"))]


def _failure(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def check_upsample(paragraph: str, workdir: Path, words: list[str]) -> None:
    """The upsample command left what the README says, for as many inputs as it asked, and every
    sample downsamples to its input: to 1e-5 before uint8 rounding (summary.json), and exactly on the
    written uint8 files (the outputs are projected within the pixel range and rounded block by
    block: conditional.project_box, to_uint8_consistent)."""
    import numpy as np

    (out,) = (workdir / "upsampled").iterdir()
    names = _leaves(paragraph.split("The upsample mode", 1)[1])
    assert names[0] == "upsampled/step<step>/" and len(names) > 2, names
    for name in names[1:]:
        assert (out / name).exists(), f"README says the upsample mode writes {name}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_consistency_error"] <= 1e-5, summary
    num = int([w for w in words if w.startswith("--config.upsample.num_images=")][0].split("=", 1)[1])
    with np.load(out / "upsampled.npz") as data:
        inputs, samples, originals = data["inputs"], data["samples"], data["originals"]
    assert inputs.shape[0] == samples.shape[0] == originals.shape[0] == num, (inputs.shape, samples.shape)
    n, k, h, w, c = samples.shape
    assert (h, w) == (2 * inputs.shape[1], 2 * inputs.shape[2]) and originals.shape[1:3] == (h, w)
    blocks = samples.astype(np.float64).reshape(n, k, h // 2, 2, w // 2, 2, c)
    down = blocks.mean((3, 5))  # the demo's area Down
    # Black background next to a stroke included (before project_box, clipped blocks missed by levels).
    error = np.abs(down - inputs[:, None].astype(np.float64))
    assert error.max() == 0.0 and summary["max_consistency_error_uint8_levels"] == 0.0, \
        f"a sample does not downsample to its input ({error.max()} levels)"
    assert len(list((out / "images").glob("*.png"))) == n * k


# Small sizes appended to the "Using it" commands (the README's own flags come first).
SMALL = {
    "sample": ["--config.sample.num_images=10", "--config.sample.batch_size=10", "--config.sample.steps=6"],
    "eval": ["--config.eval.num_samples=20", "--config.eval.num_reference=20", "--config.sample.batch_size=10",
             "--config.sample.steps=6"],
    "override": ["--config.train.num_steps=2", "--config.checkpoint.every_steps=2",
                 "--config.sample.num_images=10", "--config.sample.batch_size=10", "--config.sample.steps=6"],
}


@pytest.mark.slow
def test_readme_first_command_verbatim_then_using_it(tmp_path):
    text = README.read_text()
    two = section(text, "## The two commands")
    first = fenced_blocks(two)[0].strip()
    assert first == FIRST_COMMAND  # the README's text is what runs below
    repo = fresh_copy(tmp_path / "lapflow-jax")

    proc = run_bash(first, repo, timeout=3600)
    assert proc.returncode == 0, _failure(proc)
    workdir = repo / shlex.split(first)[-1].split("=", 1)[1]
    # The paragraph right after the first command's block says what it leaves in the workdir.
    after = two.split(FIRST_COMMAND, 1)[1].split("**2.", 1)[0]
    leaves = _leaves(after)
    assert {"checkpoints/", "tensorboard/", "metrics.jsonl"} <= set(leaves), leaves
    assert any(p.endswith(".png") for p in leaves), leaves
    for name in leaves:
        path = workdir / name
        assert path.is_dir() if name.endswith("/") else path.is_file(), f"README says the demo leaves {name}"
    assert list((workdir / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(json.dumps(r) for r in records)
    last_step = _checkpoint_steps(workdir)[-1]

    # "Using it", in order, in the venv the first command made.
    kinds = {}
    for comment, command in using_it():
        k = kind(comment, command)
        kinds[k] = command
        words = shlex.split(command)
        small = SMALL.get(k, [])
        run = ". .venv/bin/activate && " + shlex.join(words + small)
        proc = run_bash(run, repo, timeout=1800)
        target = repo / [w for w in words if w.startswith("--workdir=")][0].split("=", 1)[1]
        if k == "misspelt":
            assert proc.returncode != 0, f"a misspelt field was accepted: {command}"
            assert "Traceback" not in proc.stdout + proc.stderr, _failure(proc)
            field = [w for w in words if w.startswith("--config.")][-1].split("=", 1)[0].rsplit(".", 1)[1]
            lines = [line for line in proc.stderr.splitlines() if line.strip()
                     and not line.startswith("Pass --helpshort or --helpfull")]
            assert len(lines) == 1 and field in lines[0], _failure(proc)
            assert not target.exists(), "the misspelt command did work before refusing"
            continue
        assert proc.returncode == 0, f"{command} {' '.join(small)}\n{_failure(proc)}"
        if k == "train":  # already trained: resumes, takes no step
            assert _checkpoint_steps(target)[-1] == last_step
        elif k == "override":
            assert _checkpoint_steps(target)[-1] == 2  # the loop may also keep its first step
        else:
            paragraph = section(text, "## Using it").split("```")[-1]
            if k == "upsample":
                check_upsample(paragraph, target, words)
            elif k == "sample":
                names = _leaves(paragraph.split("the eval mode", 1)[0])
                (out,) = (target / "generated").iterdir()
                for name in names[1:]:  # the first is the folder, generated/step<step>/
                    assert (out / name).is_file(), f"README says the sample mode writes {name}"
                import numpy as np

                with np.load(out / "samples.npz") as data:
                    assert data["images"].shape[0] == 10 and data["images"].dtype == np.uint8
            else:
                (metrics,) = (target / "eval").glob("step*/metrics.json")
                first = json.loads(metrics.read_text())
                assert first["metrics"], "empty eval metrics"
                # The same command again: it reuses the samples and reports the same numbers.
                proc = run_bash(run, repo, timeout=1800)
                assert proc.returncode == 0, f"{command} {' '.join(small)} (again)\n{_failure(proc)}"
                assert "0 part(s) to do" in proc.stderr, _failure(proc)
                assert json.loads(metrics.read_text())["metrics"] == first["metrics"]
    assert set(kinds) == {"train", "sample", "eval", "upsample", "override", "misspelt"}, kinds
