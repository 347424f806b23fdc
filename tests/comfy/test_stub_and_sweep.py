"""The harness's own parts that need no server: the torchvision/torchaudio stand-ins and the sweep's choice."""

from __future__ import annotations

import subprocess
import sys

from tests.comfy import matrix
from tests.comfy.harness import TORCHVISION_STUB_DIR

# What ComfyUI 0.33.0 imports from them at start-up, and a use of each that must fail loudly.
_STUB_CHECK = """
import torchvision, torchaudio
from torchvision.ops import roi_align, deform_conv2d
import torchvision.transforms.functional as TVF
from torchvision.transforms.functional import InterpolationMode
from torchvision.transforms import ToPILImage, ToTensor
from torchvision.models.optical_flow import raft_large
import torchaudio.functional as AF
from torchaudio.transforms import MelScale
from _torch_family_stub import TorchFamilyUnavailable

class Subclass(MelScale):
    pass

failures = []
for use in (lambda: roi_align(1), lambda: TVF.resize(1, 2), lambda: Subclass(), lambda: torchaudio.load("x"),
            lambda: InterpolationMode.BICUBIC()):
    try:
        use()
        failures.append("no error")
    except TorchFamilyUnavailable as error:
        failures.append(str(error).split(" is not available")[0])
print(failures)
print(hasattr(torchvision, "__wrapped__"), torchvision.__version__, TVF.__name__)
try:
    import numpy.no_such_module
except ImportError:
    print("other packages unaffected")
"""


def test_stand_ins_import_every_submodule_and_raise_when_used():
    result = subprocess.run([sys.executable, "-c", _STUB_CHECK], capture_output=True, text=True, check=False,
                            env={"PYTHONPATH": str(TORCHVISION_STUB_DIR), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "['torchvision.ops.roi_align', 'torchvision.transforms.functional.resize', "
        "'torchaudio.transforms.MelScale', 'torchaudio.load', "
        "'torchvision.transforms.functional.InterpolationMode.BICUBIC']",
        "False 0.0.0+harness.stub torchvision.transforms.functional",
        "other packages unaffected",
    ]


def test_sweep_takes_one_frontend_per_three_minors_and_each_pinned_one():
    available = ["1.58.1", "1.57.5", "1.55.18", "1.55.2", "1.52.7", "1.52.6", "1.49.7", "1.49.6", "1.46.15",
                 "1.40.10", "1.40.0", "1.37.11", "1.34.9", "1.32.10", "1.32.9", "1.31.2", "1.28.9", "1.25.11",
                 "1.25.10", "1.24.0.post1", "1.24.0"]
    assert matrix.sweep_frontends(available, "1.58.1") == [
        "1.25.10", "1.28.9", "1.31.2", "1.32.9", "1.34.9", "1.37.11", "1.40.10", "1.46.15", "1.49.6", "1.52.7",
        "1.55.18", "1.58.1"]  # no 1.43 release in this list: that step is left out, not guessed
    # The held-back newest ends the sweep.
    assert matrix.sweep_frontends(available, "1.55.2")[-2:] == ["1.52.7", "1.55.2"]


def test_sweep_serves_each_frontend_on_the_comfyui_of_its_time():
    assert [matrix.sweep_server_for(v) for v in ("1.25.10", "1.31.2", "1.32.9", "1.46.15", "1.49.6", "1.58.1")] == [
        "0.3.52", "0.3.52", "0.3.75", "0.3.75", "0.33.0", "0.33.0"]
