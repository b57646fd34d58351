"""The package's layers, as its folders show them: a module imports only from its own
layer and the layers below it, so pure computation never reaches for a file, and formats
never for the daemon's runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "n2s_stream"

LAYERS: dict[str, float] = {
    # shared by every layer: errors, what flows between stages, the option machinery
    "errors": 0,
    "stages": 0,
    "options": 0,
    # pure computation: no threads, no files
    "n2s": 1,
    "models": 1,
    "pretrained": 2,  # the shipped model: package data and its loader (a file format)
    # file and wire formats
    "formats": 2,
    # the typed config object (its option types come from the layers below)
    "config": 2.5,
    "runtime": 3,
    "sources": 4,
    "sinks": 4,
    "commands": 5,
    # the composition root and the command line
    "daemon": 6,
    "cli": 6,
    "__main__": 6,
    "__init__": 0,
}


def layer_of(module: str) -> float:
    """The layer of ``n2s_stream.<first>...``."""
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0


def imports_of(path: Path) -> set[str]:
    """Every ``n2s_stream`` module that ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "n2s_stream":
                found |= {f"n2s_stream.{a.name}" for a in node.names if a.name != "__version__"}
            elif node.module.startswith("n2s_stream."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("n2s_stream.")}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)


def test_every_module_imports_only_its_layer_and_those_below():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for imported in sorted(imports_of(path)):
            if imported != "n2s_stream" and layer_of(imported) > layer_of(here):
                broken.append(f"{here} imports {imported}")
    assert not broken, "\n".join(broken)


def test_sources_and_sinks_know_nothing_of_each_other():
    """Both sit above the runtime, side by side: a way in never reaches for a way out."""
    crossing = []
    for folder, other in (("sources", "sinks"), ("sinks", "sources")):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            crossing += [
                f"{module_name(path)} imports {imported}"
                for imported in sorted(imports_of(path))
                if imported.startswith(f"n2s_stream.{other}")
            ]
    assert not crossing, crossing


def test_every_folder_and_root_module_has_a_layer():
    names = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    assert names <= set(LAYERS), names - set(LAYERS)


def test_the_package_root_holds_few_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 9, modules  # the shared base, config, the daemon and the CLI


def test_the_command_line_help_and_check_config_load_no_torch():
    probe = (
        "import sys\n"
        "from n2s_stream import cli\n"
        "for argv in (['--help'], ['check-config', '--template']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'scipy', 'h5py') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"  # none of the heavy imports


def test_no_stage_takes_more_than_eight_parameters():
    """A stage takes its own config section, the shared services (store, metrics,
    scheduler) and what it works on; more than eight parameters means loose values."""
    crowded = []
    for folder in ("runtime", "sources", "sinks"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ClassDef):
                    continue
                for init in (f for f in node.body if isinstance(f, ast.FunctionDef)):
                    if init.name == "__init__":
                        count = len(init.args.args) - 1 + len(init.args.kwonlyargs)
                        if count > 8:
                            crowded.append(f"{path.name}: {node.name} takes {count}")
    assert not crowded, crowded
