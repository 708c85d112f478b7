"""The design's import rules, checked on the source: slimcore never imports api or worker; api never
imports torch (directly or through slimcore modules that do)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(pkg: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in (ROOT / pkg).rglob("*.py"):
        mods: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module.split(".")[0])
        found[str(f.relative_to(ROOT))] = mods
    return found


def test_slimcore_does_not_import_service_layers():
    bad = {f: m & {"api", "worker"} for f, m in _imports("slimcore").items() if m & {"api", "worker"}}
    assert not bad, bad


def test_api_never_imports_torch_statically():
    heavy = {"torch", "torchvision", "torch_pruning", "onnx", "onnxruntime", "worker"}
    bad = {f: m & heavy for f, m in _imports("api").items() if m & heavy}
    assert not bad, bad


def test_api_import_loads_no_torch():
    """Importing every api module (which may use slimcore's torch-free spec) must not pull in torch."""
    mods = [str(p.relative_to(ROOT).with_suffix("")).replace("/", ".") for p in (ROOT / "api").rglob("*.py")]
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_torchscript_or_pt2_job_does_not_import_onnx():
    """``import onnx`` costs 1.5 s and a worker runs each job in a fresh process: the ONNX importer and
    exporter register lazily (``Registry.lazy``) and load on first use, which still works."""
    code = ("import sys; from slimcore.pipeline import _load_plugins, IMPORTERS, EXPORTERS; _load_plugins(); "
            "assert 'onnx' not in sys.modules, 'onnx imported'; "
            "assert IMPORTERS.names() == ['onnx', 'pt2', 'torchscript'] and 'onnx' in EXPORTERS; "
            "f = IMPORTERS.get('onnx'); assert 'onnx' in sys.modules and f.__name__ == 'import_onnx'; "
            "assert EXPORTERS.get('onnx').__module__ == 'slimcore.export.onnx'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
