"""The image's helpers that run without building it: the pip settings handed to a build
(scripts/image_build.py) and the web health check's Host (docker/healthcheck.py).
``make image-check`` builds the image and runs every role (docs/deploy.md)."""
from __future__ import annotations

import configparser
import importlib.util
import urllib.request

from scripts import image_build
from tests.helpers import REPO_ROOT


def load_healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", REPO_ROOT / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_health_check_asks_under_a_host_django_allows():
    served_host = load_healthcheck().served_host
    assert served_host("models.example.com,www.example.com") == "models.example.com"
    assert served_host(" .example.com") == "example.com"
    assert served_host("*") == "localhost"
    assert served_host("") == "localhost"


def test_a_local_index_reaches_the_build_over_loopback(tmp_path, monkeypatch):
    """A file:// simple index (pages linking ../../files/) and a find-links directory on this machine
    become loopback URLs whose pages and files resolve; other settings pass through."""
    (tmp_path / "index/simple/demo").mkdir(parents=True)
    (tmp_path / "index/files").mkdir()
    (tmp_path / "index/files/demo-1.0-py3-none-any.whl").write_bytes(b"wheel bytes")
    (tmp_path / "index/simple/demo/index.html").write_text(
        '<a href="../../files/demo-1.0-py3-none-any.whl">demo-1.0-py3-none-any.whl</a>')
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels/other-2.0-py3-none-any.whl").write_bytes(b"other")
    conf = tmp_path / "host-pip.conf"
    conf.write_text(f"[global]\nextra-index-url = file://{tmp_path}/index/simple https://pypi.example/simple\n"
                    f"find-links = {tmp_path}/wheels\ndefault-timeout = 42\n")
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT", "PIP_CERT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    with image_build.pip_secrets(tmp_path) as secrets:
        built = configparser.ConfigParser()
        built.read(tmp_path / "pip.conf")
        local_index, remote_index = built["global"]["extra-index-url"].split()
        page = urllib.request.urlopen(local_index + "demo/", timeout=10).read().decode()
        wheel_url = urllib.request.urljoin(local_index + "demo/", page.split('"')[1])
        assert urllib.request.urlopen(wheel_url, timeout=10).read() == b"wheel bytes"
        listing = urllib.request.urlopen(built["global"]["find-links"], timeout=10).read().decode()
        assert "other-2.0-py3-none-any.whl" in listing
    assert local_index.startswith("http://127.0.0.1:") and remote_index == "https://pypi.example/simple"
    assert built["global"]["default-timeout"] == "42"
    assert "127.0.0.1" in built["global"]["trusted-host"].split()
    assert secrets[:2] == ["--secret", f"id=pip.conf,src={tmp_path / 'pip.conf'}"]
