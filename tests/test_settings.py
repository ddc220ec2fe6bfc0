"""Settings: flags over environment over TOML file, validated once with clear messages;
and the command line's own refusals, run in-process where no server has to start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pocketpacs.cli import main
from pocketpacs.settings import Settings, SettingsError, load_settings


@pytest.fixture
def config(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "pocketpacs.toml"
        path.write_text(text)
        return path

    return write


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI reads the real environment: no POCKETPACS_ variable from outside leaks in."""
    for name in list(os.environ):
        if name.startswith("POCKETPACS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert settings.dicom_port == 11112
    assert settings.http_port == 8000
    assert settings.ae_title == "POCKETPACS"
    assert settings.host == "127.0.0.1"
    assert settings.embedded_s3 is True
    assert settings.open is False
    assert settings.index_url == f"sqlite:///{Path('pocketpacs-data/index.sqlite3').resolve()}"


def test_flags_override_environment_override_file(config, tmp_path: Path) -> None:
    path = config(
        'data_dir = "/srv/from-file"\n'
        "dicom_port = 1000\n"
        "http_port = 9000\n"
        'ae_title = "FROMFILE"\n'
        'database_url = "postgresql+psycopg://pacs@db/pacs"\n'
    )
    environ = {"POCKETPACS_DICOM_PORT": "2000", "POCKETPACS_AE_TITLE": "FROMENV"}

    file_only = load_settings(config_file=path, environ={})
    assert (file_only.dicom_port, file_only.ae_title, file_only.http_port) == (
        1000,
        "FROMFILE",
        9000,
    )
    assert file_only.data_dir == Path("/srv/from-file")
    assert file_only.index_url == "postgresql+psycopg://pacs@db/pacs"

    with_env = load_settings(config_file=path, environ=environ)
    assert (with_env.dicom_port, with_env.ae_title, with_env.http_port) == (2000, "FROMENV", 9000)

    with_flags = load_settings(
        {"dicom_port": 3000, "ae_title": None, "data_dir": tmp_path}, path, environ
    )
    assert with_flags.dicom_port == 3000  # the flag wins
    assert with_flags.ae_title == "FROMENV"  # a flag not given (None) overrides nothing
    assert with_flags.http_port == 9000
    assert with_flags.data_dir == tmp_path


def test_environment_values_are_typed_and_empty_ones_ignored(config) -> None:
    path = config("http_port = 9000\n")
    settings = load_settings(
        config_file=path,
        environ={
            "POCKETPACS_HTTP_PORT": "",  # set but empty: as if unset
            "POCKETPACS_S3_SECURE": "true",
            "POCKETPACS_INGEST_WORKERS": "4",
            "POCKETPACS_S3_ENDPOINT": "minio.internal:9000",
            "POCKETPACS_S3_ACCESS_KEY": "key",
            "POCKETPACS_S3_SECRET_KEY": "secret",
            "POCKETPACS_NOT_A_SETTING": "ignored",
        },
    )
    assert settings.http_port == 9000
    assert settings.s3_secure is True
    assert settings.ingest_workers == 4
    assert settings.embedded_s3 is False


def test_unknown_toml_key(config) -> None:
    path = config("dicom_port = 104\ns3_bukcet = 'typo'\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(config_file=path, environ={})
    message = str(caught.value)
    assert "unknown setting" in message
    assert "s3_bukcet" in message
    assert str(path) in message


def test_malformed_or_missing_toml_file(config, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(config_file=config("dicom_port = \n"), environ={})
    with pytest.raises(SettingsError, match="cannot read the configuration file"):
        load_settings(config_file=tmp_path / "missing.toml", environ={})


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"flags": {"dicom_port": 70000}}, "dicom_port"),
        ({"flags": {"http_port": 0}}, "http_port"),
        ({"environ": {"POCKETPACS_HTTP_PORT": "eighty"}}, "http_port"),
        ({"toml": "dicom_port = -1\n"}, "dicom_port"),
        ({"flags": {"ingest_workers": 0}}, "ingest_workers"),
    ],
)
def test_invalid_port_or_number(config, source: dict, field: str) -> None:
    path = config(source["toml"]) if "toml" in source else None
    with pytest.raises(SettingsError) as caught:
        load_settings(source.get("flags"), path, source.get("environ", {}))
    assert f"invalid configuration: {field}:" in str(caught.value)


@pytest.mark.parametrize("title", ["A" * 17, "BAD\\AE", "   ", "TAB\tAE"])
def test_invalid_ae_title(title: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"ae_title": title}, environ={})
    message = str(caught.value)
    assert "ae_title" in message
    assert "1 to 16 printable characters" in message


def test_ae_title_of_sixteen_characters_and_padding() -> None:
    assert load_settings({"ae_title": "A" * 16}, environ={}).ae_title == "A" * 16
    assert load_settings({"ae_title": "  PACS  "}, environ={}).ae_title == "PACS"


def test_host_must_be_an_address(config) -> None:
    with pytest.raises(SettingsError, match="not an IP address"):
        load_settings({"host": "pacs.example.org"}, environ={})
    assert load_settings({"host": "::1"}, environ={}).host == "::1"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_open_refused_off_loopback(host: str) -> None:
    with pytest.raises(SettingsError, match=r"--open .* refused unless bound to loopback"):
        load_settings({"open": True, "host": host}, environ={})
    # The same host without --open is fine, and --open from the environment is refused too.
    assert load_settings({"host": host}, environ={}).host == host
    with pytest.raises(SettingsError, match="--open"):
        load_settings({"host": host}, environ={"POCKETPACS_OPEN": "true"})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1"])
def test_open_allowed_on_loopback(host: str) -> None:
    assert load_settings({"open": True, "host": host}, environ={}).open is True


def test_external_s3_needs_keys() -> None:
    with pytest.raises(SettingsError, match="POCKETPACS_S3_ACCESS_KEY"):
        load_settings(environ={"POCKETPACS_S3_ENDPOINT": "minio:9000"})
    with pytest.raises(SettingsError, match="POCKETPACS_S3_SECRET_KEY"):
        load_settings(
            environ={"POCKETPACS_S3_ENDPOINT": "minio:9000", "POCKETPACS_S3_ACCESS_KEY": "k"}
        )


def test_settings_are_frozen() -> None:
    settings = load_settings(environ={})
    with pytest.raises(ValueError):
        settings.dicom_port = 1  # type: ignore[misc]
    assert isinstance(settings, Settings)


# the command line ----------------------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--http-port", "0x"], "argument --http-port: invalid int value: '0x'"),
        (["serve", "--dicom-port", "eleven"], "argument --dicom-port: invalid int value"),
        (["serve", "--http-port"], "argument --http-port: expected one argument"),
        (["import"], "the following arguments are required: PATH"),
        (["check", "--dicom-port", "104"], "unrecognized arguments: --dicom-port 104"),
        ([], "the following arguments are required: command"),
        (["restore"], "invalid choice: 'restore'"),
    ],
)
def test_cli_refuses_malformed_arguments(capsys, args: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "usage: pocketpacs" in err
    assert expected in err


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--dicom-port", "70000"], "dicom_port"),
        (["serve", "--ae-title", "A_VERY_LONG_AE_TITLE"], "1 to 16 printable characters"),
        (["serve", "--open", "--host", "0.0.0.0"], "--open accepts anyone"),
        (["serve", "--host", "localhost"], "'localhost' is not an IP address"),
        (["check", "--config", "missing.toml"], "cannot read the configuration file"),
    ],
)
def test_cli_reports_invalid_settings(capsys, tmp_path: Path, args, expected: str) -> None:
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("pocketpacs: ")
    assert expected in captured.err
    assert not (tmp_path / "pocketpacs-data").exists()  # nothing was started or created


@pytest.mark.usefixtures("clean_env")
def test_cli_reads_the_config_file_and_environment(
    capsys, monkeypatch: pytest.MonkeyPatch, config
) -> None:
    path = config("dicom_port = 104\nunknown_thing = 1\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "unknown setting(s) unknown_thing" in capsys.readouterr().err

    monkeypatch.setenv("POCKETPACS_HTTP_PORT", "not-a-port")
    assert main(["serve"]) == 2
    assert "http_port" in capsys.readouterr().err
    # The flag overrides the bad environment value; a bad AE title then is what is refused.
    monkeypatch.setenv("POCKETPACS_AE_TITLE", "X" * 17)
    assert main(["serve", "--http-port", "8080"]) == 2
    err = capsys.readouterr().err
    assert "ae_title" in err
    assert "http_port" not in err


def test_data_dir_is_made_absolute_so_every_process_finds_the_same_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve` started in one folder and `import` in another must name the same directory:
    the embedded S3 server and the spool are recognised by their absolute path."""
    monkeypatch.chdir(tmp_path)
    default = load_settings({}, environ={}).data_dir
    relative = load_settings({"data_dir": Path("archive")}, environ={}).data_dir
    assert default == tmp_path / "pocketpacs-data"
    assert relative == tmp_path / "archive"
    monkeypatch.chdir("/")
    assert load_settings({"data_dir": tmp_path / "archive"}, environ={}).data_dir == relative
