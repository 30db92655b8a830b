"""Imports go one way (docs/ARCHITECTURE.md): a package imports only from its own layer or the ones
below it, and `ccq --help` / `--version` / every command's `--help` start without torch."""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ccq"
# lowest first; a module may import from its own layer and those before it
LAYERS = ["ccq.version", "ccq.codec", "ccq.kernels", "ccq.models", "ccq.format", "ccq.serving", "ccq.plan", "ccq.calibration",
          "ccq.pipeline", "ccq.eval", "ccq.tiny", "ccq.demo", "ccq.integration", "ccq.cli", "ccq"]


def layer(module: str) -> int:
    best = max((name for name in LAYERS if module == name or module.startswith(name + ".")), key=len)
    return LAYERS.index(best)


def imports(path: Path, module: str):
    """Every ccq module `path` imports (also inside functions), absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
            yield from (n for n in names if n.split(".")[0] == "ccq")
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "ccq")


def test_imports_go_one_way():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for target in imports(path, module):
            if layer(target) > layer(module):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


COMMANDS = [[], ["quantize"], ["plan"], ["synth"], ["inspect"], ["demo"], ["eval"], ["eval", "ppl"],
            ["eval", "chartqa"]]


@pytest.mark.parametrize("args", [["--version"]] + [c + ["--help"] for c in COMMANDS])
def test_cli_starts_without_heavy_imports(args):
    code = ("import sys\nfrom ccq.cli import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n    assert not e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'numba', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n" % (args,))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - t0 < 5  # loose (a shared CI machine); about 0.2 s when idle


def test_device_defaults_to_the_gpu_when_there_is_one():
    import torch

    from ccq.cli import default_device

    assert default_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert default_device("cpu") == "cpu" and default_device("cuda:1") == "cuda:1"
