"""No code execution on load: the package source never unpickles, never `eval`s and never trusts remote code.

The scan parses every Python file of the package (and of benchmarks/ and examples/) with `ast`, so it sees real calls
and imports, not words in docstrings or comments, and cannot be fooled by a `.eval()` method call (`model.eval()`).
It flags:

- importing `pickle`, `cPickle`, `_pickle`, `dill`, `cloudpickle`, `joblib`, `marshal` or `shelve`, or any use of a
  name `pickle`;
- `torch.load(...)` (or `from torch import load`) without `weights_only=True`;
- a call of the builtins `eval(...)`, `exec(...)` or `compile(...)`, and `__import__(...)`;
- `trust_remote_code=True` as a keyword argument, and `allow_pickle=True` (numpy);
- `pd.read_pickle`/`np.load` style helpers named `*pickle*`.

A planted file with each bad pattern proves the scanner finds them, and a count of scanned files proves it looked.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_FOLDERS = ("peft_cvae", "benchmarks", "examples", "scripts")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
CODE_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted_name(node: ast.AST) -> str:
    """`torch.load` for Attribute(Name(torch), load); '' for anything that is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def scan_source(source: str, filename: str = "<source>") -> list[str]:
    """Return one 'file:line: what' string per unsafe pattern in a Python source text."""
    findings = []
    tree = ast.parse(source, filename=filename)

    def flag(node: ast.AST, what: str) -> None:
        findings.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    flag(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLE_MODULES:
                flag(node, f"imports from {node.module}")
            if node.module == "torch" and any(alias.name == "load" for alias in node.names):
                flag(node, "imports torch.load by name (its weights_only cannot be checked)")
        elif isinstance(node, ast.Name) and "pickle" in node.id.lower():
            flag(node, f"uses the name {node.id}")
        elif isinstance(node, ast.Attribute) and "pickle" in node.attr.lower():
            flag(node, f"uses the attribute {node.attr}")
        elif isinstance(node, ast.Call):
            name = _dotted_name(node.func)
            keywords = {keyword.arg: keyword.value for keyword in node.keywords if keyword.arg}
            if isinstance(node.func, ast.Name) and node.func.id in CODE_BUILTINS:
                flag(node, f"calls {node.func.id}()")
            if name.endswith("torch.load") and not _is_true(keywords.get("weights_only", ast.Constant(None))):
                flag(node, "calls torch.load without weights_only=True")
            for keyword in ("trust_remote_code", "allow_pickle"):
                if keyword in keywords and not (
                    isinstance(keywords[keyword], ast.Constant) and keywords[keyword].value is False
                ):
                    flag(node, f"passes {keyword}={ast.unparse(keywords[keyword])}")
    return findings


def python_files() -> list[Path]:
    files = []
    for folder in SCANNED_FOLDERS:
        if (ROOT / folder).is_dir():
            files += sorted((ROOT / folder).rglob("*.py"))
    return files


def test_package_source_has_no_unpickling_eval_or_remote_code():
    files = python_files()
    assert len(files) >= 10, f"the scan found only {len(files)} Python files under {ROOT}: is the path right?"
    assert ROOT / "peft_cvae" / "modeling_peft_cvae.py" in files
    findings = [finding for path in files for finding in scan_source(path.read_text("utf-8"), str(path))]
    assert findings == [], "unsafe patterns in the package source:\n" + "\n".join(findings)


PLANTED = {
    "import pickle": "imports pickle",
    "import joblib as jl": "imports joblib",
    "from dill import loads": "imports from dill",
    "from torch import load": "imports torch.load by name",
    "state = torch.load(path)": "torch.load without weights_only=True",
    "state = torch.load(path, weights_only=False)": "torch.load without weights_only=True",
    "state = torch.load(path, map_location='cpu')": "torch.load without weights_only=True",
    "value = eval(text)": "calls eval()",
    "exec(code, {})": "calls exec()",
    "module = __import__(name)": "calls __import__()",
    "AutoModel.from_pretrained(repo, trust_remote_code=True)": "passes trust_remote_code=True",
    "AutoModel.from_pretrained(repo, trust_remote_code=flag)": "passes trust_remote_code=flag",
    "numpy.load(path, allow_pickle=True)": "passes allow_pickle=True",
    "frame = pandas.read_pickle(path)": "uses the attribute read_pickle",
}


@pytest.mark.parametrize("line", sorted(PLANTED))
def test_scanner_finds_a_planted_unsafe_line(line, tmp_path):
    planted = tmp_path / "planted.py"
    header = '"""A module."""\n\nimport torch\n\n\ndef load_it(path, text, code, name, repo, flag):\n'
    planted.write_text(f"{header}    {line}\n")
    findings = scan_source(planted.read_text(), str(planted))
    assert len(findings) >= 1 and all(finding.startswith(f"{planted}:7: ") for finding in findings), findings
    assert any(PLANTED[line] in finding for finding in findings), findings


def test_scanner_allows_safe_look_alikes(tmp_path):
    safe = '''"""Docstrings may say pickle, eval( and torch.load( freely; comments too."""
import torch

def run(model, path):
    model.eval()  # nn.Module.eval is a method, not the builtin
    state = torch.load(path, weights_only=True)
    other = AutoModel.from_pretrained("x", trust_remote_code=False)
    text = "trust_remote_code=True is never passed"
    return state, other, text
'''
    assert scan_source(safe, "safe.py") == []
