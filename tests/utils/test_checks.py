"""The shared argument and label checks (lightning_selfreg.utils.checks): one rule each, used everywhere."""

import numpy as np
import pytest
import torch

from lightning_selfreg.models import UNet
from lightning_selfreg.models.third_party import monai_basic_unet
from lightning_selfreg.segmentation.module import SelfRegSegModule
from lightning_selfreg.utils.checks import SettingError, check_int, check_spatial_dims, label_problem

LABELS = [  # (labels, num_classes, the problem or None)
    ([[0, 2], [1, 0]], 3, None),
    ([0, 3], 3, "expected class indices in [0, 3), found values in [0, 3]"),
    ([-1, 1], 3, "expected class indices in [0, 3), found values in [-1, 1]"),
    ([0.0, 2.0], 3, None),
    ([0.0, 14.0], 9, "expected class indices in [0, 9), found values in [0, 14]"),
    ([0.0, 0.5], 3, "expected class indices in [0, 3), found non-integer values"),
    ([0.0, float("nan")], 3, "expected class indices in [0, 3), found non-integer values"),
    ([True, False], 2, None),
    ([], 2, None),
]


@pytest.mark.parametrize(("labels", "num_classes", "problem"), LABELS)
def test_label_problem_is_the_same_for_arrays_and_tensors(labels, num_classes, problem):
    array = np.array(labels)
    found = label_problem(array, num_classes)
    assert found == problem if found is None or "non-integer" not in found else found.startswith(problem)
    tensor = torch.as_tensor(array) if array.size else torch.zeros(0, dtype=torch.long)
    assert label_problem(tensor, num_classes) == problem


def test_label_problem_names_a_non_numeric_dtype():
    assert label_problem(np.array(["a"]), 3) == "expected class indices in [0, 3), found dtype <U1"
    assert label_problem(torch.zeros(2, dtype=torch.complex64), 3).endswith("found dtype torch.complex64")


@pytest.mark.parametrize("bad", [1, 4, True, "2", 2.0])
def test_spatial_dims_is_checked_once_for_the_module_and_every_network(bad):
    for build in (lambda: check_spatial_dims(bad), lambda: UNet(1, 3, spatial_dims=bad),
                  lambda: SelfRegSegModule(torch.nn.Identity(), 3, spatial_dims=bad)):
        with pytest.raises(SettingError, match=r"`spatial_dims` must be 2 or 3") as info:
            build()
        assert info.value.parameter == "spatial_dims"
    pytest.importorskip("monai")
    with pytest.raises(SettingError, match=r"`spatial_dims` must be 2 or 3"):
        monai_basic_unet(1, 3, spatial_dims=bad)


def test_check_int_refuses_bools_and_floats():
    assert check_int(3, "n", 1) == 3
    for bad in (0, True, 2.0, "2"):
        with pytest.raises(SettingError, match=r"`n` must be an int >= 1") as info:
            check_int(bad, "n", 1)
        assert info.value.parameter == "n"
