"""The command line (experiments.run on LightningCLI): aliases, presets, configs, errors, the run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from experiments import cli, compare, flags, run
from lightning_selfreg import SelfRegSegModule
from lightning_selfreg.models import list_models
from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "experiments" / "configs"
TINY = ["--gpus", "0", "--width", "4", "--image-size", "32", "--max-epochs", "1", "--batch-size", "16",
        "--redundancy", "null"]


def read_metrics(out, name):
    return json.loads((out / name / "metrics.json").read_text())


def parse(argv, cuda=False):
    return cli.SelfRegCLI(flags.expand_aliases(argv, cuda_available=cuda), instantiate=False).config


def test_aliases_are_the_full_keys_and_expand_the_same_in_every_ddp_rank():
    argv = ["--gpus", "4", "--dataset", "synapse", "--data-dir", "/d", "--lambda-scr", "0.1", "--lr", "0.5",
            "--seed", "3", "--val-cases", "case0001", "case0002", "--resume", "--run-name", "x"]
    full = flags.expand_aliases(argv)
    assert full == flags.expand_aliases(argv)  # Lightning re-launches every rank with the same argv
    assert full[:2] == ["--config", str(CONFIGS / "synapse_unet.yaml")]  # the preset first: flags win over it
    pairs = dict(zip(full[2::2], full[3::2], strict=True))
    assert pairs == {"--trainer.accelerator": "gpu", "--trainer.devices": "4", "--trainer.strategy": "ddp",
                     "--data.data_dir": "/d", "--selfreg.lambda_scr": "0.1", "--model.lr": "0.5",
                     "--seed_everything": "3", "--data.val_cases": "[case0001, case0002]", "--run.resume": "true",
                     "--run.name": "x"}
    assert flags.expand_aliases(["--gpus", "0", "--no-selfreg"])[-2:] == ["--selfreg", "null"]
    assert flags.expand_aliases(["--gpus", "0"])[:2] == ["--config", str(CONFIGS / "sample.yaml")]
    assert flags.expand_aliases([], cuda_available=True)[1] == str(CONFIGS / "sample_gpu.yaml")
    # --config without --dataset: the file is the whole configuration, no preset under it
    assert flags.expand_aliases(["--config", "my.yaml", "--gpus", "0"])[:2] == ["--config", "my.yaml"]


def test_two_gpus_choose_ddp_and_one_gpu_does_not():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    def pairs(argv):
        full = flags.expand_aliases(argv)[2:]
        return dict(zip(full[::2], full[1::2], strict=True))

    assert pairs(["--gpus", "2"]) == {"--trainer.accelerator": "gpu", "--trainer.devices": "2",
                                      "--trainer.strategy": "ddp"}
    assert pairs(["--gpus", "1"]) == {"--trainer.accelerator": "gpu", "--trainer.devices": "1"}
    assert pairs(["--gpus", "0"]) == {"--trainer.accelerator": "cpu", "--trainer.devices": "1"}
    config = parse(["--gpus", "2"])
    assert config["trainer"]["strategy"] == "ddp" and run._is_ddp(config) and not run._is_ddp(parse(["--gpus", "1"]))
    # what that strategy builds (on CPU processes here: the same DDP strategy Lightning gives two GPUs)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=config["trainer"]["strategy"], logger=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.world_size == 2
    single = pl.Trainer(accelerator="cpu", devices=1, strategy=parse(["--gpus", "1"])["trainer"]["strategy"],
                        logger=False)
    assert isinstance(single.strategy, SingleDeviceStrategy)


def test_precedence_file_then_flags_and_presets_by_device(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("selfreg:\n  init_args:\n    lambda_scr: 0.1\ntrainer:\n  max_epochs: 7\nmodel:\n  lr: 0.5\n")
    config = parse(["--gpus", "0", "--dataset", "sample", "--config", str(cfg), "--max-epochs", "3"])
    assert config["selfreg"]["init_args"]["lambda_scr"] == 0.1  # from the file
    assert config["selfreg"]["init_args"]["lambda_ifd"] == 0.015  # SelfReg's own default
    assert config["trainer"]["max_epochs"] == 3  # the flag beats the file
    assert config["model"]["lr"] == 0.5 and config["model"]["optimizer"] == "adam"  # file over the CPU preset
    assert config["model"]["net"]["init_args"]["base_channels"] == 16
    assert parse(["--gpus", "0", "--no-selfreg"])["selfreg"] is None
    gpu = parse([], cuda=True)  # the GPU preset of the sample: the paper's UNet at 96 px (224 px scored Dice 0)
    assert gpu["model"]["net"]["init_args"]["base_channels"] == 64 and gpu["trainer"]["accelerator"] == "gpu"
    assert parse(["--gpus", "0", "--dataset", "synapse", "--data-dir", "."])["data"]["init_args"]["image_size"] == 224


def test_defaults_are_written_once_in_the_constructors():
    """A preset writes only what differs from the constructors' defaults (0.015, 0.4 CE live in the signatures)."""
    for path in CONFIGS.rglob("*.yaml"):
        text = path.read_text()
        assert "lambda_scr: 0.015" not in text and "ce_weight: 0.4" not in text, path
    assert not hasattr(run, "OPTIONS") and not hasattr(run, "DEFAULTS") and not hasattr(run, "PRESETS")


BAD = [  # (flags, the start of the one line after "error: "): the flag as typed, what was expected, what was found
    (["--model.lr", "abc"], "--model.lr: expected a float, found 'abc'"),
    (["--lr", "abc"], "--lr: expected a float, found 'abc'"),  # named as typed: the alias
    (["--colour", "red"], "--colour: expected a setting listed by --help"),
    (["--model.colour", "red"], "--model.colour: expected a parameter of SelfRegSegModule, found 'colour'"),
    (["--model.net.init_args.foo", "3"], "--model.net.init_args.foo: expected a parameter of UNet, found 'foo'"),
    (["--dataset", "synapse", "--data-dir", ".", "--data.image_sise", "3"],  # **kwargs reach SegDataModule's
     "--data.image_sise: expected a parameter of SynapseDataModule such as 'image_size', found 'image_sise'"),
    (["--model.optimizer", "rmsprop"], "--model.optimizer: expected one of 'sgd', 'adam', 'adamw', found 'rmsprop'"),
    (["--run.wandb", "sometimes"], "--run.wandb: expected one of 'auto', 'offline'"),
    (["--wandb", "sometimes"], "--wandb: expected one of 'auto', 'offline'"),
    (["--model.class_names", "[a]"], "--model.class_names: expected no value (it is set from the DataModule's"),
    (["--selfreg.lambda_scr", "nan"], "--selfreg.lambda_scr: expected a float, found 'nan'"),
    (["--lambda-scr", "-0.5"], "--lambda-scr: `lambda_scr` must be a finite number >= 0, found -0.5"),
    (["--image-size", "8"], "--image-size: the network UNet cannot take inputs"),  # too small for 4 poolings
    (["--data.batch_size", "0"], "--data.batch_size: `batch_size` must be an int >= 1, found 0"),
    (["--width", "1"], "--width: `base_channels` must be an int >= 2, found 1"),  # the network's own check
    (["--data.batch_transform", "lightning_selfreg.data.RandomAffine", "--data.batch_transform.zoom", "0.5"],
     "--data.batch_transform.zoom: `zoom` must be >= 1"),  # a class inside a class
    (["--selfreg.taps", "{final: x}"], "--selfreg.taps: `taps`: A TapSpec needs student taps"),
    (["--precision", "16-mixed"], "--precision: expected 32, 32-true or bf16-mixed on a CPU"),  # no float16 on CPUs
    (["--dataset", "mnist"], "--dataset: expected one of sample, synapse"),
    (["--backbone", "resnet"], "--backbone: expected one of"),
    (["--dataset", "synapse"], "--data.data_dir: `data_dir` must be the dataset's folder"),  # no --data-dir
    (["--data-dir", "/nonexistent/sample"], "--data-dir: Data directory /nonexistent/sample does not exist"),
    # issue 21 §3: what the Trainer or LightningCLI would accept, named with what is expected
    (["--seed", "-1"], "--seed: expected an integer in [0, 4294967295]"),
    (["--seed", str(2**70)], "--seed: expected an integer in [0, 4294967295]"),
    (["--precision", "64"], "--precision: expected one of 32-true, 16-mixed, bf16-mixed"),
    (["--lr", "-1"], "--lr: `lr` must be a finite number > 0, found -1.0"),
    (["--lr", "0"], "--lr: `lr` must be a finite number > 0"),
    (["--max-epochs", "0"], "--max-epochs: expected an integer >= 1, found 0 (0 trains nothing)"),
    (["--max-epochs", "-1"], "--max-epochs: expected an integer >= 1, found -1 (-1 would train forever)"),
    (["--trainer.max_steps", "0"], "--trainer.max_steps: expected an integer >= 1, or -1"),
    (["--no-selfreg", "--lambda-scr", "0.1"], "--no-selfreg: conflicts with --lambda-scr"),
    (["--lambda-ifd=0.2", "--no-selfreg"], "--no-selfreg: conflicts with --lambda-ifd"),
    (["--selfreg", "null", "--selfreg.pairing", "ordered"], "--selfreg: null conflicts with --selfreg.pairing"),
    (["--config", "/nonexistent/run.yaml"], "--config: /nonexistent/run.yaml: file not found"),
    # the UNet's depth given (4 levels below the input), so that the planner's own depth does not fit the patch
    (["--dataset", "nnunet", "--patch-size", "16", "16", "16", "--batch-size", "1", "--width", "4", "--data.fold",
      "null", "--model.net.init_args.depth", "4"],
     "--patch-size: the network UNet cannot train on a batch of 1 of shape (1, 1, 16, 16, 16) (the DataModule's "
     "size); the smallest size from [16, 16, 16] it takes is [32, 16, 16]"),
    (["--dataset", "nnunet", "--patch-size", "8", "32", "32", "--width", "4", "--data.fold", "null",
      "--model.net.init_args.depth", "4"],
     "--patch-size: the network UNet cannot take inputs of shape (1, 1, 8, 32, 32) (the DataModule's size); the "
     "smallest size from [8, 32, 32] it takes is [16, 32, 32]"),
]


@pytest.mark.parametrize(("flags", "key"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_settings_exit_2_with_one_line_before_anything_is_written(tmp_path, capsys, flags, key):
    out = tmp_path / "runs"
    assert run.main(["--gpus", "0", "--output-dir", str(out), "--run.wandb", "disabled", *flags]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"error: {key}") and "\n" not in message, message
    assert not out.exists()


@pytest.mark.parametrize(("text", "found"), [
    ("", "expected a mapping of settings (e.g. `trainer:` / `  max_epochs: 10`), found an empty file"),
    ("- a\n- b\n", "expected a mapping of settings (key: value lines), found a list (['a', 'b'])"),
    ("model:\n  lr: [0.1\ntrainer: x\n", "YAML syntax error at line 3, column 8: expected ',' or ']', but got ':' "
                                          "(while parsing a flow sequence that starts at line 2, column 7)"),
    ("model:\n\tlr: 0.1\n", "YAML syntax error at line 2, column 1: found character '\\t' that cannot start any "
                             "token"),
])
def test_a_bad_config_file_is_named_with_the_line(tmp_path, capsys, text, found):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert run.main(["--gpus", "0", "--config", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --config: {path}: {found}"
    assert not (tmp_path / "runs").exists()


def test_the_python_api_names_integer_or_empty_feature_maps():
    from lightning_selfreg import SelfRegLoss, ifd_loss, scr_loss

    good = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"`feature` must be a floating-point feature map, found dtype torch.int64"):
        ifd_loss(torch.ones(2, 4, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`final` must be a non-empty feature map, found shape \(0, 4, 8, 8\)"):
        scr_loss(good, torch.ones(0, 4, 8, 8))
    with pytest.raises(ValueError, match=r"`feature` must be a floating-point feature map, found dtype torch.int32"):
        scr_loss(good.int(), good)
    loss = SelfRegLoss({"g": ["a"]}, {"g": ["a"]})
    with pytest.raises(ValueError, match=r"`features\['a'\]` must be a non-empty feature map, found shape "
                                         r"\(2, 4, 0, 8\)"):
        loss({"a": torch.ones(2, 4, 0, 8)}, good)
    with pytest.raises(ValueError, match=r"`final` must be a floating-point feature map, found dtype torch.uint8"):
        loss({"a": good}, good.to(torch.uint8))


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="needs a machine with fewer than 4 GPUs")
def test_more_gpus_than_the_machine_has_is_named(tmp_path, capsys):
    assert run.main(["--gpus", "4", "--output-dir", str(tmp_path / "r"), "--wandb", "disabled"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: --gpus: ") and "\n" not in message  # trainer.accelerator, as typed
    assert not (tmp_path / "r").exists()


def test_swin_unet_at_a_size_it_cannot_take_is_named(capsys, tmp_path):
    """SwinUnet's own check of `img_size`, a value linked from the data: named by the data setting."""
    assert run.main(["--gpus", "0", "--backbone", "swinunet", "--image-size", "100", "--output-dir",
                     str(tmp_path), "--wandb", "disabled"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: --image-size: SwinUnet: `img_size` (100, 100)") and "\n" not in message
    assert message.endswith("(passed on as its `img_size`)")


def test_a_bad_setting_in_a_config_file_is_named_with_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "sample.yaml").read_text().replace("base_channels: 16", "base_channels: sixteen"))
    assert "sixteen" in bad.read_text()
    assert run.main(["--config", str(bad), "--gpus", "0", "--output-dir", str(tmp_path / "r")]) == 2
    message = capsys.readouterr().err.strip()
    assert message == (f"error: --model.net.init_args.base_channels: expected an int, found 'sixteen' (in {bad})")
    assert not (tmp_path / "r").exists()


def test_run_writes_metrics_config_and_a_checkpoint_that_rebuilds_its_model(tiny_run, capsys):
    run_dir, printed = tiny_run  # run.main(TINY_RUN + --output-dir OUT --run-name tiny), once per session
    out = run_dir.parent
    metrics = read_metrics(out, "tiny")
    assert (metrics["dataset"], metrics["backbone"], metrics["selfreg"], metrics["seed"]) == \
        ("samplect", "unet", True, 0)
    per_class = metrics["test"]["per_class"]
    assert list(per_class) == ["aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas",
                               "spleen", "stomach"]
    assert all(set(v) == {"dice", "iou", "hd95"} for v in per_class.values())
    assert per_class["liver"]["dice"] is not None
    assert "| protocol |" in (out / "tiny" / "metrics.md").read_text()
    # the run folder to look at: curves, one picture per test case, no redundancy picture without the monitor
    assert (out / "tiny" / "curves.png").stat().st_size > 0 and not (out / "tiny" / "redundancy.png").exists()
    assert [p.name for p in (out / "tiny" / "overlays").iterdir()] == ["001_totalseg_dicom.png"]
    assert "HD95 strict (mm)" in (out / "tiny" / "metrics.md").read_text()
    config = yaml.safe_load((out / "tiny" / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 1 and config["model"]["net"]["init_args"]["base_channels"] == 4
    last = out / "tiny" / "checkpoints" / "last.ckpt"
    assert not list((out / "tiny").rglob(".tmp*"))  # atomic_write's temporary files are .tmp<pid>.<name>
    assert "| liver |" in printed and "| **mean** |" in printed
    # the checkpoint alone rebuilds the model: network class and arguments, data-linked sizes, hyper-parameters
    module = SelfRegSegModule.load_from_checkpoint(last, map_location="cpu")
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert module.state_dict().keys() == saved.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in saved.items())
    assert module.hparams.net["init_args"]["base_channels"] == 4 and module.hparams.num_classes == 9
    assert module.hparams.input_size == 32 and module.hparams.channels_last is True
    run_config = torch.load(last, map_location="cpu", weights_only=True)["config"]  # the rest of the run
    assert run_config["selfreg"]["init_args"]["lambda_scr"] == 0.015 and run_config["redundancy"] is None
    assert run_config["data"]["init_args"]["image_size"] == 32 and run_config == config
    # resuming that run with another identity (seed, network) is refused before anything changes there
    before = sorted(p.name for p in (out / "tiny").rglob("*"))
    assert run.main([*TINY_RUN, "--output-dir", str(out), "--run-name", "tiny", "--resume", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "seed_everything" in err and "differ from" in err and "\n" not in err
    assert sorted(p.name for p in (out / "tiny").rglob("*")) == before


def test_run_baseline_with_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs" / "base"))
    out = tmp_path / "runs"
    assert run.main([*TINY, "--output-dir", str(out), "--run-name", "base", "--no-selfreg"]) == 0
    assert read_metrics(out, "base")["selfreg"] is False
    offline_runs = list((out / "base").rglob("offline-run-*"))
    assert offline_runs, "an offline W&B run folder must be written"
    assert list(offline_runs[0].glob("run-*.wandb"))


def test_print_config_output_runs_as_is(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:  # jsonargparse prints the configuration and exits 0
        run.main(["--gpus", "0", "--width", "4", "--lambda-ifd", "0.02", "--print_config"])
    assert done.value.code in (0, None)
    path = tmp_path / "printed.yaml"
    path.write_text(capsys.readouterr().out)
    config = parse(["--config", str(path)])
    assert config["selfreg"]["init_args"]["lambda_ifd"] == 0.02
    assert config["model"]["net"]["init_args"]["base_channels"] == 4
    assert run.main(["--config", str(path), "--fast-dev-run", "--image-size", "32", "--output-dir",
                     str(tmp_path / "r"), "--wandb", "disabled"]) == 0


def _config_flags(name, tmp_path):
    """Small, fast overrides (and the data folder) for a fast_dev_run of a shipped config."""
    from tests.conftest import write_synapse_layout
    from tests.data.test_data import write_acdc, write_uctransnet

    small = ["--image-size", "32", "--width", "4"]
    if name.startswith("synapse"):
        root = write_synapse_layout(tmp_path / "synapse", n_train_cases=6, size=(32, 32))
        swin = ["--model.net.init_args.embed_dim", "12", "--model.net.init_args.window_size", "2",
                "--model.net.init_args.num_heads", "[1, 1, 1, 1]", "--model.net.init_args.depths", "[1, 1, 1, 1]"]
        return ["--data-dir", str(root), "--val-cases", "case0001",
                *(["--image-size", "32", *swin] if "swin" in name else small)]
    if name.startswith("acdc"):
        return ["--data-dir", str(write_acdc(tmp_path / "acdc")), *small]
    if name.startswith(("glas", "monuseg")):
        return ["--data-dir", str(write_uctransnet(tmp_path / "h", val=True)), *small]
    # the bundled nnU-Net sample has one training case: no fold 0 of five
    if name == "nnunet_2d.yaml":
        return ["--patch-size", "32", "32", "--width", "4", "--samples-per-epoch", "4", "--data.fold", "null"]
    if name in ("nnunet_3d.yaml", "sample_3d.yaml"):  # a coarse sliding window: the test volume in few windows
        return ["--patch-size", "16", "32", "32", "--width", "4", "--samples-per-epoch", "4", "--data.fold", "null",
                "--model.sw_overlap", "0", "--model.sw_batch_size", "32"]
    return small


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_instantiates_and_runs(path, tmp_path):
    flags = ["--config", str(path), *_config_flags(path.name, tmp_path), "--gpus", "0", "--num-workers", "0",
             "--fast-dev-run", "--output-dir", str(tmp_path / "runs"), "--run-name", "r", "--wandb", "disabled",
             "--redundancy", "null"]
    if path.name.startswith("sample") and "3d" not in path.name:
        flags.remove("--num-workers"), flags.remove("0")  # SampleCTDataModule reads in the main process
    assert run.main(flags) == 0
    assert (tmp_path / "runs" / "r" / "metrics.json").is_file()


def test_the_backbone_names_are_the_registry_names_and_each_has_its_file():
    assert flags.BACKBONES == tuple(list_models())  # one list: --backbone takes what create_model takes
    assert sorted(p.stem.replace("_", "-") for p in (CONFIGS / "backbones").glob("*.yaml")) == list(flags.BACKBONES)


@pytest.mark.parametrize("name", [p.stem for p in sorted((CONFIGS / "backbones").glob("*.yaml"))])
def test_backbone_files_parse_and_name_their_class(name):
    if name == "smp_unet":
        pytest.importorskip("segmentation_models_pytorch")
    config = parse(["--gpus", "0", "--backbone", name.replace("_", "-")])
    assert config["model"]["net"]["class_path"].rsplit(".", 1)[-1].lower().replace("_", "") in \
        name.replace("_", "").replace("monai", "").replace("smp", "")


@pytest.mark.slow
def test_default_run_learns_the_liver(tmp_path):
    """The README's main job, as a user runs it: the liver must reach a clearly non-trivial Dice."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--gpus", "0", "--output-dir", str(tmp_path), "--run-name", "d",
         "--wandb", "disabled"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path, "d")
    per_class = metrics["test"]["per_class"]
    assert per_class["liver"]["dice"] >= 0.5, per_class  # README: seeds 0-2 scored 90.4-92.9 %
    assert per_class["kidney_left"]["dice"] is None or per_class["kidney_left"]["dice"] == 0.0
    assert "| liver |" in proc.stdout


def test_compare_logs_the_summary_to_an_offline_wandb_run(tmp_path, monkeypatch, capsys):
    """The driver only: each child run is faked by writing its metrics.json."""

    def fake_run(cmd, env):
        # the last occurrence wins, as in the CLI: the run's own flags come after the shared ones
        def last(flag):
            return cmd[len(cmd) - 1 - cmd[::-1].index(flag) + 1]

        out = Path(last("--output-dir")) / last("--run-name")
        out.mkdir(parents=True)
        seed, selfreg = int(last("--seed")), "--no-selfreg" not in cmd
        dice = 0.8 + 0.01 * seed + (0.02 if selfreg else 0.0)
        metrics = {"dataset": "sample", "backbone": "unet", "selfreg": selfreg, "seed": seed,
                   "test": {"dice_mean": dice, "hd95_mean": 5.0, "per_class": {"liver": {"dice": dice, "hd95": 5.0}}}}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return 0

    monkeypatch.setattr(compare, "run_child", fake_run)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run.main(["--gpus", "0", "--compare", "--seeds", "0", "1", "--seed", "7", "--output-dir", str(tmp_path),
                     "--run-name", "cmp", "--wandb", "offline"]) == 0
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["difference"]["liver"]["dice"]["mean"] == pytest.approx(0.02)
    (offline,) = (tmp_path / "cmp").rglob("offline-run-*")  # the summary goes to an offline W&B run
    from tests.tracking.test_tracking import finished_records, parse_run

    (record,) = [r.run for r in finished_records(offline) if r.WhichOneof("record_type") == "run"]
    assert (record.run_group, record.job_type) == ("cmp", "compare")  # beside the runs it summarises
    history, _, _ = parse_run(offline)
    assert {"compare/table", "compare/plot", "compare/summary"} <= set().union(*history)
    printed = capsys.readouterr().out
    assert "W&B comparison run" in printed and "[compare] run 4/4: selfreg, seed 1" in printed
    assert compare.main(["--seeds", "x"]) == 2
    assert compare.main(["--gpus", "0", "--no-selfreg", "--config", str(CONFIGS / "sample.yaml"),
                         "--selfreg", "null"]) == 2  # no SelfReg arm to compare


def test_a_third_party_network_by_class_path_trains_with_its_ready_taps(tmp_path):
    """MONAI's own BasicUNet (no tap_spec attribute, no registry code, no taps in the file): SelfReg finds the ready
    spec of its class."""
    pytest.importorskip("monai")
    out = tmp_path / "runs"
    assert run.main(["--gpus", "0", "--backbone", "monai-basicunet", "--model.net.init_args.features",
                     "[4, 4, 8, 8, 16, 4]", "--image-size", "32", "--fast-dev-run", "--output-dir", str(out),
                     "--run-name", "m", "--wandb", "disabled", "--redundancy", "null"]) == 0
    config = parse(["--gpus", "0", "--backbone", "monai-basicunet"])
    assert config["model"]["net"]["class_path"] == "monai.networks.nets.BasicUNet"
    assert config["selfreg"]["init_args"]["taps"] is None
    assert read_metrics(out, "m")["backbone"] == "basicunet"
