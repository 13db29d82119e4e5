"""`pip install .` installs the optimizer alone, needing only torch."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_lossgrad_alone_and_requires_only_torch(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("lossgrad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if ".dist-info/" not in n] == ["lossgrad.py"]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert len(requires) == 1 and requires[0].split(":", 1)[1].strip().startswith("torch")
