"""Server settings: validation with one-line errors, and the round trip to worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungcad.errors import LungcadError
from lungcad.serving.settings import SETTINGS_ENVIRONMENT_VARIABLE, ServeSettings


def test_defaults_follow_the_issue(tmp_path: Path) -> None:
    settings = ServeSettings.build(models_dir=tmp_path)
    assert (settings.host, settings.port, settings.backend) == ("127.0.0.1", 8000, "eager")
    assert (settings.max_batch_size, settings.max_wait_ms, settings.max_queue) == (64, 5.0, 1024)
    assert settings.classify_max_bytes >= 32 * 48 * 48 * 4 + 128  # one float32 .npy crop


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backend": "tensorrt"}, "backend"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"port": 70000}, "port"),
        ({"workers": 0}, "workers"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_option(
    tmp_path: Path, values: dict[str, object], message: str
) -> None:
    with pytest.raises(LungcadError, match=message) as refused:
        ServeSettings.build(models_dir=tmp_path, **values)
    assert "\n" not in str(refused.value)


def test_missing_models_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(LungcadError, match=f"{tmp_path / 'nope'}: models folder not found"):
        ServeSettings.build(models_dir=tmp_path / "nope")


def test_environment_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ServeSettings.build(models_dir=tmp_path, backend="onnx", max_queue=7)
    for key, value in settings.to_environment().items():
        monkeypatch.setenv(key, value)
    assert ServeSettings.from_environment() == settings
    monkeypatch.delenv(SETTINGS_ENVIRONMENT_VARIABLE)
    with pytest.raises(LungcadError, match="lungcad serve"):
        ServeSettings.from_environment()
