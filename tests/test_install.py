"""What ./setup.sh leaves behind, checked as a user meets it."""

import os
import subprocess
import sys
import sysconfig

import pytest

PTH = os.path.join(sysconfig.get_paths()["purelib"], "altlora-python-dir.pth")


@pytest.mark.skipif(not os.path.exists(PTH), reason="environment not made by ./setup.sh")
def test_a_folder_named_altlora_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    (tmp_path / "altlora").mkdir()  # e.g. the parent folder of a clone named altlora
    out = subprocess.run([sys.executable, "-c", "import altlora; print(altlora.__file__, altlora.AltLoRA.__name__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == "AltLoRA" and out.stdout.split()[0].endswith("__init__.py")
