"""The nnU-Net planner: patch, batch, depth from the dataset's shape and the device; the CLI's use of it."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments import cli, flags, run
from experiments.planning import NNUNET_PRESETS, plan_arguments, plan_record
from lightning_selfreg.data.nnunet.planner import (
    CPU_FLOPS_PER_S,
    CPU_TRAIN_SECONDS,
    GIB,
    DatasetShape,
    DeviceBudget,
    device_budget,
    plan_configuration,
    unet_cost,
)
from lightning_selfreg.models import UNet
from tests.data.test_nnunet import write_nnunet

CPU = device_budget("cpu")
BIG_GPU = device_budget("gpu", 80 * GIB, "H100")
CT = DatasetShape(median_shape=(482, 512, 512), spacing=(0.8, 0.7, 0.7), num_training_cases=131)  # large CT
PROSTATE = DatasetShape(median_shape=(20, 320, 320), spacing=(4.0, 0.6, 0.6), num_training_cases=32)
SAMPLE = DatasetShape(median_shape=(51, 101, 122), spacing=(3.0, 3.0, 3.0), num_training_cases=1,
                      total_voxels=51 * 101 * 122)


def fits(plan, width, num_classes=9):
    activations, _, params = unet_cost(plan.patch_size, width, plan.depth, 1, num_classes)
    return plan.batch_size * activations * 1.5 + 16 * params


def test_a_small_dataset_is_trained_at_its_median_shape():
    plan = plan_configuration(SAMPLE, "3d", BIG_GPU, 1, 9, base_channels=32)
    assert plan.patch_size == (56, 104, 128)  # the median shape in multiples of 2^depth
    assert plan.depth == 3  # 51 / 2^3 >= 4 > 51 / 2^4
    assert plan.batch_size == 2 and "5%" in plan.reasons["batch"]  # one case: a batch covers <= 5 % of it
    assert plan.fold is None and "1 training case" in plan.reasons["fold"]
    assert plan.samples_per_epoch == 500 and plan.max_epochs is None  # nnU-Net's 250 iterations, preset epochs


def test_the_patch_shrinks_to_the_memory_budget_where_it_exceeds_the_median_most():
    gpu = plan_configuration(CT, "3d", BIG_GPU, 1, 4, base_channels=32)
    assert gpu.patch_size == (96, 112, 128) and gpu.depth == 4 and gpu.fold == 0  # z (0.8 mm) cut first
    assert fits(gpu, 32, 4) <= 8 * GIB  # nnU-Net's 8 GiB reference, also on an 80 GB GPU
    same = [replace(plan_configuration(CT, "3d", device_budget("gpu", m * GIB), 1, 4, 32), device="")
            for m in (16, 24, 80)]
    assert same[0] == same[1] == same[2]  # the same recipe on any GPU of >= 16 GiB
    small = plan_configuration(CT, "3d", device_budget("gpu", 8 * GIB), 1, 4, 32)
    assert np.prod(small.patch_size) < np.prod(gpu.patch_size) and fits(small, 32, 4) <= 4 * GIB
    cpu = plan_configuration(CT, "3d", CPU, 1, 4)
    assert fits(cpu, 16, 4) <= CPU.memory_bytes and np.prod(cpu.patch_size) < np.prod(small.patch_size)
    # an anisotropic dataset: the in-plane axes, far beyond their share, shrink first; depth from the thin axis
    prostate = plan_configuration(PROSTATE, "3d", device_budget("gpu", 8 * GIB), 2, 3, 32)
    assert prostate.patch_size[0] >= 16 and prostate.patch_size[1] < 320 and prostate.depth == 2


def test_2d_plans_slices_and_fills_the_budget_with_the_batch():
    plan = plan_configuration(CT, "2d", BIG_GPU, 1, 4, base_channels=32)
    assert len(plan.patch_size) == 2 and plan.batch_size >= 12 and plan.depth == 5
    assert fits(plan, 32, 4) <= 8 * GIB < fits(replace(plan, batch_size=plan.batch_size + 1), 32, 4)
    assert plan.samples_per_epoch == 250 * plan.batch_size


def test_a_cpu_plan_is_small_and_short():
    for configuration in ("2d", "3d"):
        plan = plan_configuration(SAMPLE, configuration, CPU, 1, 9)
        assert plan.base_channels == 16 and plan.num_workers == 0
        assert plan.log_every_n_steps <= plan.samples_per_epoch // plan.batch_size  # every epoch in metrics.csv
        flops = unet_cost(plan.patch_size, 16, plan.depth, 1, 9)[1]
        seconds = plan.samples_per_epoch * plan.max_epochs * flops / CPU_FLOPS_PER_S[configuration]
        assert 0.5 * CPU_TRAIN_SECONDS <= seconds <= CPU_TRAIN_SECONDS  # fitted to the CPU's training budget
        assert plan.estimated_train_s == pytest.approx(seconds) and "min of training on one core" in plan.line()
    assert plan_configuration(SAMPLE, "2d", CPU, 1, 9).patch_size == (112, 128)


def test_fold_follows_the_number_of_cases_and_a_splits_file():
    four = DatasetShape((30, 64, 64), (1.0, 1.0, 1.0), 4)
    assert plan_configuration(four, "3d", CPU).fold is None
    assert plan_configuration(DatasetShape((30, 64, 64), (1.0, 1.0, 1.0), 5), "3d", CPU).fold == 0
    assert plan_configuration(DatasetShape((30, 64, 64), (1.0, 1.0, 1.0), 1, has_splits_file=True), "3d",
                              CPU).fold == 0
    tiny = plan_configuration(DatasetShape((300, 300, 300), (1, 1, 1), 9), "3d", DeviceBudget("cpu", "x", 1000, 10.0))
    assert tiny.patch_size == (8, 8, 8) and "exceeds" in tiny.reasons["patch"]  # says so when nothing fits
    with pytest.raises(ValueError, match="configuration"):
        plan_configuration(four, "2.5d", CPU)


def saved_activation_bytes(net, x, y):
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = net(x)
        F.cross_entropy(logits, y).backward()
    return sum(seen.values())


@pytest.mark.parametrize(("patch", "width", "depth"), [((16, 32, 40), 8, 2), ((64, 80), 8, 3)])
def test_unet_cost_is_what_autograd_keeps(patch, width, depth):
    net = UNet(1, 9, width, depth, len(patch))
    x, y = torch.randn(1, 1, *patch), torch.zeros(1, *patch, dtype=torch.long)
    activations, _, params = unet_cost(patch, width, depth, 1, 9)
    assert params == sum(p.numel() for p in net.parameters())
    assert 0.9 <= activations / saved_activation_bytes(net, x, y) <= 1.2


# --- the command line ------------------------------------------------------------------------------------------

def parse(args):
    return cli.SelfRegCLI(args, instantiate=False).config


def test_dataset_nnunet_alone_gets_the_plan_and_explicit_flags_win():
    args, plan = plan_arguments(flags.expand_aliases(["--dataset", "nnunet", "--configuration", "2d", "--gpus", "0"]))
    assert args[:2] == ["--config", str(NNUNET_PRESETS["2d"])]  # the preset follows --configuration
    config = parse(args)
    assert list(config["data"]["init_args"]["patch_size"]) == list(plan.patch_size) == [112, 128]
    assert config["data"]["init_args"]["fold"] is None and config["model"]["net"]["init_args"]["depth"] == 4
    assert config["trainer"]["max_epochs"] == plan.max_epochs
    argv = ["--dataset", "nnunet", "--gpus", "0", "--patch-size", "32", "48", "64", "--batch-size", "3", "--width",
            "8"]
    args, plan = plan_arguments(flags.expand_aliases(argv))
    config = parse(args)
    assert args[1] == str(NNUNET_PRESETS["3d"]) and len(plan.patch_size) == 3
    assert list(config["data"]["init_args"]["patch_size"]) == [32, 48, 64]
    assert config["data"]["init_args"]["batch_size"] == 3 and config["model"]["net"]["init_args"]["base_channels"] == 8
    record = plan_record(plan, config)
    assert record["overridden"] == {"data.patch_size": [32, 48, 64], "data.batch_size": 3,
                                    "model.net.init_args.base_channels": 8}
    # no nnU-Net preset: nothing planned (another dataset, or the user's own --config as the whole configuration)
    assert plan_arguments(flags.expand_aliases(["--gpus", "0"]))[1] is None
    assert plan_arguments(["--config", str(NNUNET_PRESETS["3d"]).replace("nnunet_3d", "sample")])[1] is None


def test_dataset_nnunet_runs_in_2d_and_saves_its_plan(tmp_path, capsys):
    """The issue's failure: --configuration 2d kept the 3D preset's patch. Now planned, and it runs."""
    data = write_nnunet(tmp_path / "Dataset001_Toy")
    out = tmp_path / "runs"
    assert run.main(["--dataset", "nnunet", "--data-dir", str(data), "--configuration", "2d", "--gpus", "0",
                     "--fast-dev-run", "--wandb", "disabled", "--output-dir", str(out), "--run-name", "p",
                     "--data.cache_dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "p" / "plan.json").read_text())
    assert plan["configuration"] == "2d" and len(plan["patch_size"]) == 2 and plan["fold"] == 0  # 5 cases
    assert plan["line"] in printed and plan["overridden"] == {}
