"""The multi-host layout: every program has one host role; deploy/hosts/*.conf are current."""

import subprocess
import sys

from minard import stack
from minard.ops import topology


def test_every_production_program_runs_on_exactly_one_host_role():
    roles = [p for r in topology.ROLES for p in r.programs]
    production = [h.split(":", 1)[1] for h, _ in topology.sections(topology.PRODUCTION.read_text())
                  if h.startswith("program:")]
    assert sorted(roles) == sorted(production)
    assert set(roles) <= {p.name for p in stack.PROGRAMS}


def test_deploy_hosts_files_are_current():
    """Regenerate with: python -m minard.ops.topology"""
    for path, text in topology.generated().items():
        assert path.read_text() == text, f"{path}: run python -m minard.ops.topology"


def test_each_host_role_file_is_a_valid_supervisord_configuration_with_its_group(tmp_path):
    for path, text in topology.generated().items():
        role = path.stem
        for old in ("/opt/minard", "/var/log/minard", "/run/minard"):  # the host's directories, here
            new = tmp_path / role / old.strip("/").replace("/", "_")
            new.mkdir(parents=True, exist_ok=True)
            text = text.replace(old, str(new))
        conf = tmp_path / f"{role}.conf"
        conf.write_text(text)
        out = subprocess.run([sys.executable, "-c", (
            "import sys; from supervisor.options import ServerOptions; o = ServerOptions(); "
            f"o.realize(['-c', {str(conf)!r}]); "
            "print(' '.join(sorted(g.name + ':' + ','.join(sorted(p.name for p in g.process_configs)) "
            "for g in o.process_group_configs)))")], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        want = next(r for r in topology.ROLES if r.name == role)
        assert out.stdout.split() == [f"minard_{role}:" + ",".join(sorted(want.programs))]


def test_the_deploy_doc_names_every_role_and_the_ports_it_opens():
    text = (topology.ROOT / "docs" / "deploy.md").read_text()
    for role in topology.ROLES:
        assert f"`{role.name}`" in text, role.name
        for port in role.opens:
            assert port.split(":")[0].split(",")[0].split(" ")[0] in text
