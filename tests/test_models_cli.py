"""`automl-cxr models list|check`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch

from automl_cxr.cli import main
from automl_cxr.models import file_sha256, resolve_weights


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for key in list(os.environ):
        if key.startswith("AUTOML_CXR_WEIGHTS"):
            monkeypatch.delenv(key)


def test_models_list_json(capsys: pytest.CaptureFixture):
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n for n, r in rows.items() if r["paper"]} == {
        "vgg19",
        "mobilenetv2_100",
        "inception_v3",
        "legacy_xception",
        "inception_resnet_v2",
    }
    mb = rows["mobilenetv2_100"]
    assert (mb["family"], mb["input_size"], mb["num_stages"]) == ("mobilenet", 224, 8)
    assert 2.0e6 < mb["params"] < 2.5e6 and mb["num_features"] == 1280
    assert mb["weights"]["kind"] == "package"
    assert mb["weights"]["path"].endswith("mobilenet_v2-b0353104.pth")
    assert rows["tf_efficientnet_lite0"]["weights"]["kind"] == "package"
    assert rows["inception_v3"]["input_size"] == 299
    assert rows["vgg19"]["weights"]["kind"] == "none"  # offline, nothing cached
    assert rows["test_resnet"]["weights"]["kind"] == "none"


def test_models_list_table(capsys: pytest.CaptureFixture):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2_100" in out and "inception_resnet_v2" in out and "package" in out


def test_models_check_offline_package(capsys: pytest.CaptureFixture):
    assert main(["models", "check", "mobilenetv2_100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    path = resolve_weights("mobilenetv2_100", checksum=False).path
    assert out["weights"]["kind"] == "package" and out["weights"]["format"] == "torchvision"
    assert out["weights"]["sha256"] == file_sha256(path)
    assert main(["models", "check", "mobilenetv2_100"]) == 0
    assert file_sha256(path) in capsys.readouterr().out


def test_models_check_explicit_file(tmp_path: Path, capsys: pytest.CaptureFixture):
    torch.manual_seed(0)
    path = tmp_path / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    assert main(["models", "check", "test_resnet", "--weights", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["weights"]["kind"], out["weights"]["path"]) == ("file", str(path))


def test_models_check_without_weights_fails_with_the_reason(capsys: pytest.CaptureFixture):
    assert main(["models", "check", "vgg19"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "'vgg19'" in err and "AUTOML_CXR_WEIGHTS_VGG19" in err


def test_models_check_unknown_name_lists_close_matches(capsys: pytest.CaptureFixture):
    assert main(["models", "check", "mobilenet_v2"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'mobilenet_v2'" in err and "mobilenetv2_100" in err
