"""``orthros --help`` on a host without pycriu (or BCC): heavy imports happen where they are used."""

from __future__ import annotations

import subprocess
import sys

# None in sys.modules makes ``import pycriu`` raise ImportError, as on a host without it.
_WITHOUT = """
import sys
sys.modules["pycriu"] = None
sys.modules["bcc"] = None
sys.argv = ["orthros", "--help"]
from orthros_py.cli import main
main()
"""


def test_help_runs_without_pycriu() -> None:
    res = subprocess.run([sys.executable, "-c", _WITHOUT], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout and "restore" in res.stdout
