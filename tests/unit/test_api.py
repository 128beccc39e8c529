from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import p2pml


def test_all_lists_exactly_the_public_names():
    public = {
        name
        for name, value in vars(p2pml).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    public.discard("annotations")  # the __future__ import
    assert set(p2pml.__all__) == public | {"__version__"}


def test_every_name_in_all_exists():
    for name in p2pml.__all__:
        assert hasattr(p2pml, name), name


def test_importing_p2pml_loads_no_heavy_dependency():
    code = (
        "import sys, p2pml; "
        "print(','.join(m for m in ('torch', 'aiohttp', 'kademlia', 'matplotlib', 'rich') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_node_without_training_loads_no_torch():
    code = "import sys, p2pml.node.node; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_only_the_overlay_kad_module_imports_kademlia():
    import pathlib
    import re

    root = pathlib.Path(p2pml.__file__).parent
    pattern = re.compile(r"^\s*(from|import)\s+(kademlia|rpcudp)\b", re.MULTILINE)
    importers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if pattern.search(path.read_text())
    )
    assert importers == ["io/overlay/kad.py"]
