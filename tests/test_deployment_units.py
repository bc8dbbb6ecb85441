"""Certificates, site keys, the commands fedtune builds for Flower, and the site agent's checks."""

import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from fedtune import tiny
from fedtune.cli import main
from fedtune.client.settings import settings_from_node_config
from fedtune.deployment.certs import CertError, CertPaths, create_site_key, init_certs
from fedtune.deployment.flower import (
    DeploymentError, run_config_arg, superlink_command, supernode_command, write_connection, write_flower_app,
)
from fedtune.deployment.site_agent import ClientOptions, node_config_file, site_settings


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_init_writes_a_ca_a_server_cert_for_the_hosts_and_site_keys(tmp_path):
    paths = init_certs(tmp_path / "certs", ["coord.example.org", "10.1.2.3"], ["site-a"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Private keys: owner only. Public material: readable.
    for private in (paths.ca_key, paths.server_key, paths.site_key("site-a")):
        assert _mode(private) == 0o600
    for public in (paths.ca_cert, paths.server_cert, paths.site_public_key("site-a")):
        assert _mode(public) == 0o644
    # The formats Flower reads: OpenSSH EC private key (SuperNode), OpenSSH public key (register).
    key = load_ssh_private_key(paths.site_key("site-a").read_bytes(), None)
    pub = load_ssh_public_key(paths.site_public_key("site-a").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert pub.public_numbers() == key.public_key().public_numbers()


def test_keys_are_never_overwritten_without_force(tmp_path):
    paths = init_certs(tmp_path, ["localhost"], ["site-a"])
    before = {p: p.read_bytes() for p in (paths.ca_key, paths.server_key, paths.site_key("site-a"))}
    with pytest.raises(CertError, match="already exist.*--force"):
        init_certs(tmp_path, ["localhost"], ["site-a"])
    with pytest.raises(CertError, match="site-a.key already exists"):
        create_site_key(paths, "site-a")
    assert all(p.read_bytes() == b for p, b in before.items())
    create_site_key(paths, "site-a", force=True)
    assert paths.site_key("site-a").read_bytes() != before[paths.site_key("site-a")]
    assert _mode(paths.site_key("site-a")) == 0o600


def test_bad_hosts_and_site_names_are_refused_before_writing(tmp_path):
    with pytest.raises(CertError, match="'bad host!'"):
        init_certs(tmp_path / "a", ["bad host!"], [])
    with pytest.raises(CertError, match="site name '../evil'"):
        init_certs(tmp_path / "b", ["localhost"], ["../evil"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fedtune_certs_cli(tmp_path, capsys):
    assert main(["certs", "init", "--dir", str(tmp_path), "--host", "coord.example.org", "--site", "a"]) == 0
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert main(["certs", "site", "b", "--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in CertPaths(tmp_path).site_public_keys()) == ["a.pub", "b.pub"]
    assert main(["certs", "site", "b", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_superlink_is_tls_and_authenticated_unless_insecure(tmp_path):
    paths = init_certs(tmp_path, ["localhost"], [])
    cmd = superlink_command(paths, "0.0.0.0", 9092, tmp_path / "db")
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(paths.server_cert)
    assert "--disable-runtime-dependency-installation" in cmd  # sites and coordinator install nothing
    insecure = superlink_command(None, "127.0.0.1", 9092, tmp_path / "db", insecure=True)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    with pytest.raises(DeploymentError, match="needs --certs"):
        superlink_command(None, "127.0.0.1", 9092, tmp_path / "db")
    with pytest.raises(DeploymentError, match="missing"):
        superlink_command(CertPaths(tmp_path / "nothing"), "127.0.0.1", 9092, tmp_path / "db")


def test_supernode_needs_ca_and_key_unless_insecure_and_always_its_auth_secret(tmp_path):
    from fedtune.deployment.site_agent import write_secret

    paths = init_certs(tmp_path, ["localhost"], ["a"])
    secret = write_secret(tmp_path)
    cmd = supernode_command("coord:9092", tmp_path / "n.toml", 9094, paths.ca_cert, paths.site_key("a"),
                            secret_file=secret)
    assert cmd[cmd.index("--root-certificates") + 1] == str(paths.ca_cert)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(paths.site_key("a"))
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(DeploymentError, match="needs --ca"):
        supernode_command("coord:9092", tmp_path / "n.toml", 9094, None, None, secret_file=secret)
    assert "--insecure" in supernode_command("coord:9092", tmp_path / "n.toml", 9094, None, None, insecure=True,
                                             secret_file=secret)
    with pytest.raises(DeploymentError, match="auth secret"):
        supernode_command("coord:9092", tmp_path / "n.toml", 9094, None, None, insecure=True)


def test_the_auth_secret_is_fresh_for_every_start_and_readable_only_by_the_site(tmp_path):
    import stat

    from fedtune.deployment.site_agent import write_secret

    first = write_secret(tmp_path).read_bytes()
    path = write_secret(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32 and path.read_bytes() != first


def test_site_settings_reach_the_client_app_through_flowers_node_config(tmp_path):
    data = tiny.write_csv(tiny.separable_rows(10), tmp_path / "my data.csv")  # a space in the path
    settings = site_settings(ClientOptions(superlink="x:1", key=tmp_path / "hospital-a.key", settings={
        "data-path": str(data), "text-column": "text", "target-epsilon": 3.0, "state-dir": str(tmp_path / "st")}))
    path = node_config_file(settings, tmp_path)
    # What flower-supernode does with --node-config FILE, then what the ClientApp does with it.
    seen = settings_from_node_config(parse_config_args([str(path)]))
    assert seen == settings
    assert seen.site_id == "hospital-a" and seen.data_path == data and seen.target_epsilon == 3.0
    assert seen.require_secure_aggregation


def test_site_settings_errors_name_the_file_and_key(tmp_path):
    data = tiny.write_csv(tiny.separable_rows(10), tmp_path / "d.csv")
    bad = tmp_path / "site.toml"
    bad.write_text(f'data-path = "{data}"\ntarget-epsilon = -1\n')
    with pytest.raises(DeploymentError, match=r"site.toml: target-epsilon: .*greater than 0"):
        site_settings(ClientOptions(superlink="x:1", settings_file=bad))
    bad.write_text(f'data-path = "{data}"\ntarget-epsilom = 1\n')
    with pytest.raises(DeploymentError, match="target-epsilom"):
        site_settings(ClientOptions(superlink="x:1", settings_file=bad))
    with pytest.raises(DeploymentError, match="no such file"):
        site_settings(ClientOptions(superlink="x:1", settings={"data-path": str(tmp_path / "none.csv")}))


def test_a_client_without_keys_or_insecure_is_refused(tmp_path, capsys):
    data = tiny.write_csv(tiny.separable_rows(10), tmp_path / "d.csv")
    rc = main(["client", "--superlink", "127.0.0.1:1", "--data", str(data), "--state-dir", str(tmp_path / "st")])
    assert rc == 2
    assert "needs --ca" in capsys.readouterr().err


def test_connection_is_added_to_flowers_config_keeping_the_rest(tmp_path):
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "other"\n[superlink.other]\naddress = "x:1"\n')
    write_connection("fedtune", "127.0.0.1:9092", tmp_path / "ca.crt", tmp_path)
    cfg = tomllib.loads((tmp_path / "config.toml").read_text())
    assert cfg["superlink"]["other"] == {"address": "x:1"}
    assert cfg["superlink"]["fedtune"] == {"address": "127.0.0.1:9092", "root-certificates": str(tmp_path / "ca.crt")}
    assert cfg["superlink"]["default"] == "fedtune"


def test_the_flower_app_points_at_the_installed_components(tmp_path):
    from flwr.common.config import validate_config

    manifest = tomllib.loads((write_flower_app(tmp_path) / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(manifest, check_module=False)  # what `flwr run` checks
    assert ok, errors
    components = manifest["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedtune.server.app:app", "clientapp": "fedtune.client.app:app"}
    assert 'config="/' in run_config_arg(tmp_path / "run.toml", tmp_path / "out")


def test_the_client_app_starts_without_torch():
    """Flower starts a fresh ClientApp process for every message, and three of SecAgg+'s four
    train messages per round do no training: importing the ClientApp must not load torch."""
    code = ("import sys, fedtune.client.app as a; assert a.app is not None; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'opacus', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- deploy/ ------------------------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_the_images_run_as_a_non_root_user_with_everything_preinstalled():
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and all(u not in ("root", "0") for u in users)
    # The wheel `make dist` builds, installed at build time: a SuperNode installs nothing at run time.
    assert "COPY dist/fedtune-*.whl" in dockerfile and "pip install /tmp/wheels/fedtune-*.whl" in dockerfile
    assert "dist:" in (DEPLOY.parent / "Makefile").read_text()
    targets = [line.split()[-1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert {"coordinator", "site"} <= set(targets)


def test_compose_runs_a_coordinator_behind_the_fleet_proxy_and_three_sites():
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    sites = sorted(name for name in services if name.startswith("site-"))
    assert sites == ["site-0", "site-1", "site-2"]
    assert compose["networks"]["internal"]["internal"] is True
    assert "ports" not in services["coordinator"] and services["coordinator"]["networks"] == ["internal"]
    for name in sites:
        command = services[name]["command"]
        assert services[name]["networks"] == ["sites"]               # sites reach only the proxy
        assert command[command.index("--superlink") + 1] == "proxy:9443"
        assert command[command.index("--key") + 1] == f"/certs/sites/{name}.key"
        assert "--insecure" not in command


def test_the_proxy_config_exposes_only_the_fleet_api():
    conf = (DEPLOY / "proxy" / "nginx.conf").read_text()
    locations = re.findall(r"location\s+(\S+)\s*\{([^}]*)\}", conf)
    assert [(path, "proxy_pass" in body) for path, body in locations] == [("/v1/fleet/", True), ("/", False)]
    assert "return 403" in dict(locations)["/"]
    k8s = list(yaml.safe_load_all((DEPLOY / "k8s" / "coordinator.yaml").read_text()))
    services = [d for d in k8s if d["kind"] == "Service"]
    assert [p["port"] for s in services for p in s["spec"]["ports"]] == [9443]
    pod = next(d for d in k8s if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    args = next(c for c in pod["containers"] if c["name"] == "coordinator")["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"   # the SuperLink: the pod's loopback only
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_systemd_unit_and_the_example_site_settings_work_together(tmp_path):
    unit = (DEPLOY / "systemd" / "fedtune-site.service").read_text()
    assert "User=fedtune" in unit and "fedtune client" in unit and "--insecure" not in unit
    example = (DEPLOY / "systemd" / "site.toml.example").read_text()
    data = tiny.write_csv(tiny.separable_rows(10), tmp_path / "notes.csv")
    settings_file = tmp_path / "site.toml"
    settings_file.write_text(example.replace("/srv/data/notes.csv", str(data))
                             .replace('"/var/lib/fedtune"', f'"{tmp_path / "state"}"'))
    settings = site_settings(ClientOptions(superlink="x:1", settings_file=settings_file))
    assert settings.site_id == "hospital-a" and settings.lifetime_epsilon == 16.0
    assert settings.require_secure_aggregation


def test_the_deployed_run_config_is_valid():
    from fedtune.config import load_config

    cfg = load_config(DEPLOY / "run.toml")
    assert cfg.federation.secure_aggregation and cfg.privacy.enabled and cfg.data.eval is not None
    # The README's recipe: what a newcomer gets without setting anything (the deployed tests run it).
    defaults = load_config(None)
    for section, key in [("train", "batch_size"), ("train", "learning_rate"), ("lora", "r"), ("lora", "alpha"),
                         ("lora", "freeze_a"), ("privacy", "accountant"), ("privacy", "max_grad_norm"),
                         ("federation", "strategy"), ("federation", "server_learning_rate")]:
        ours, default = getattr(getattr(cfg, section), key), getattr(getattr(defaults, section), key)
        assert ours == default, f"deploy/run.toml {section}.{key} = {ours!r}, the default is {default!r}"


def test_the_server_checks_the_run_config_before_starting_anything(tmp_path):
    from fedtune.deployment.server_command import ServerOptions, serve

    opts = ServerOptions(certs=None, insecure=True, state_dir=tmp_path / "state", config=DEPLOY / "run.toml",
                         out=tmp_path / "run")
    with pytest.raises(DeploymentError, match="data.eval = /data/eval.csv: .*evaluation file is missing"):
        serve(opts)
    assert not (tmp_path / "run" / "logs" / "superlink.log").exists()  # no SuperLink was started
    assert not (tmp_path / "state" / "logs" / "superlink.log").exists()
