"""``minard up --hosts N``: the whole stack spread over N network namespaces (issue 18).

The production layout of docs/deploy.md ("Several hosts") on one machine, for
demonstrations, tests and benchmarks.  Each "host" is a network namespace on
the private network 198.18.<net>.0/24 (:mod:`minard.ops.netns`) running its
programs under its own supervisord: the programs of its role in
:data:`minard.ops.topology.ROLES` (what ``deploy/hosts/<role>.conf`` runs)
plus the services production runs outside supervisord (:data:`SERVICES`):

=================  ===============================================================
``data``           Redis (bound to its own address, password and ACL users)
``event_builder``  ``dispatcher`` and the replay of the bundled and synthetic runs
``monitoring``     push, the pull pool, ``data_producer``, both ORCA consumers
``monitoringK``    (N > 5) a pool-only host: one more ``minard_dispatch pull``
``daq``            the ORCA stream (``minard orca-replay``)
``front``          gunicorn (both apps), nginx, the log server, pinger, monitors,
                   notifier, dq_live; plus a veth link to this machine's namespace
                   (198.19.<net>.2) so that a browser here reaches the dashboard
=================  ===============================================================

Every connection between hosts is TCP between namespaces; every address comes
from the host's ``minard.conf`` (0600), written from the one configuration
path with the other hosts' addresses.  The secrets are made once for the whole
stack as ``minard up`` makes them (Redis password and ACL users, dispatcher
keys and credentials, pinger tokens, ZMQ CURVE keys, a shift-crew login) and
shared by the hosts, as they are distributed to every host in production.

The stack directory holds ``hosts.json`` (the namespaces and links by name,
each host's address, role and programs), the shared ``secrets/``, ``data/`` and
``var/keys.json``, and one :class:`minard.stack.Layout` per host under
``hosts/<name>/``.  ``minard down`` stops each host's supervisord and every
process of it (by pid, as for one host), kills by pid anything still inside
the namespaces, deletes the link and the namespaces by name and checks that
none is left.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click

from minard import stack
from minard.config import ROOT
from minard.ops import netns, topology
from minard.pipeline import curve

#: Programs each role runs beside its supervisord programs of deploy/hosts/<role>.conf:
#: in production these are Debian services, init scripts or the DAQ itself.
SERVICES = {"event_builder": ("replay",), "daq": ("orca_replay",), "data": ("redis",), "front": ("web", "nginx")}
#: What a pool-only monitoring host (the sixth host on) runs.
POOL_PROGRAMS = ("minard_dispatch_pull",)
#: With --sentinels: a Sentinel on both data hosts and on the front host (a quorum of 2 of 3).
SENTINEL = stack.Program("redis_sentinel", 15, 10)
SENTINEL_PORT = 26379
ALL_PROGRAMS = (*stack.PROGRAMS, SENTINEL)
STATE = "hosts.json"
#: Namespaces of this module start with this (the tests' own: "mn<digits>", "mnhub", "mnprobe").
PREFIX = "mnup"
LOGIN_USER = "shifter"
#: The order hosts are stopped in: sources first, Redis last (the pools flush into it).
STOP_WAVES = (("event_builder", "daq", "front"), ("monitoring",), ("data",))  # "data" also stops data2


@dataclass(frozen=True)
class HostPlan:
    """One host of the layout: its name, its role in minard.ops.topology, its programs in start order."""

    name: str
    role: str
    programs: tuple[str, ...]


def plan(n: int, sentinels: bool = False) -> list[HostPlan]:
    """The hosts of an *n*-host stack (n >= 5): the five roles, then pool-only monitoring hosts.

    With *sentinels* (n >= 6) the sixth host is a second data host ``data2``
    (the replica), and both data hosts and the front host run a Sentinel.
    """
    if n < 5 + sentinels:
        raise ValueError(f"a multi-host stack {'with Sentinels ' if sentinels else ''}has at least {5 + sentinels} "
                         "hosts (event builder, DAQ, monitoring, data" + (", data2" if sentinels else "") + ", front)")
    roles = {r.name: r for r in topology.ROLES}
    extra = {"data": ("redis_sentinel",), "front": ("redis_sentinel",)} if sentinels else {}

    def ordered(names) -> tuple[str, ...]:
        return tuple(p.name for p in ALL_PROGRAMS if p.name in set(names))

    hosts = [HostPlan(name, name, ordered(roles[name].programs + SERVICES.get(name, ()) + extra.get(name, ())))
             for name in ("data", "event_builder", "monitoring", "daq", "front")]
    if sentinels:
        hosts.insert(1, HostPlan("data2", "data", ordered(("redis", "redis_sentinel"))))
    hosts += [HostPlan(f"monitoring{k}", "monitoring", POOL_PROGRAMS) for k in range(2, n - len(hosts) + 2)]
    return hosts


# ----------------------------------------------------------------- state


def state_path(root: Path) -> Path:
    """Where ``minard up --hosts`` records what it made (no secrets in it)."""
    return Path(root) / STATE


def read_state(root: Path) -> dict | None:
    """The recorded multi-host stack of *root*, or None if there is none."""
    try:
        return json.loads(state_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def host_layout(root: Path, name: str) -> stack.Layout:
    """The stack Layout of host *name* (its own supervisord, configuration, logs and var)."""
    return stack.Layout(Path(root) / "hosts" / name)


def host_order(state: dict) -> list[str]:
    """Host names of *state* in start order."""
    return [h["name"] for h in state["hosts"]]


# ----------------------------------------------------------------- configuration


def _set_option(cmd: list[str], option: str, value: str) -> list[str]:
    """*cmd* with the value after *option* replaced."""
    i = cmd.index(option)
    return [*cmd[:i + 1], value, *cmd[i + 2:]]


def shared_config(cfg, shared: stack.Layout, password: str, addr: dict[str, str]):
    """The configuration every host shares: the stack's secrets and every peer's address."""
    scfg = stack.stack_config(cfg, shared, password)
    db = urllib.parse.urlsplit(str(cfg["redis_url"])).path or "/0"
    pools = [a for name, a in addr.items() if name.startswith("monitoring")]
    zmq = {key: f"tcp://{addr['monitoring']}:{stack.zmq_port(cfg[key])}" for key in ("zmq_dispatch", "zmq_cmos", "zmq_base")}
    return scfg.replace(
        redis_url=f"redis://:{urllib.parse.quote(password, safe='')}@{addr['data']}:{stack.redis_port(cfg)}{db}",
        dispatcher_host=addr["event_builder"],
        dispatcher_source_hosts=addr["event_builder"],
        dispatcher_analyzer_hosts=",".join(pools),
        orca_host=addr["daq"],
        stack_bind="0.0.0.0",  # nginx inside the front namespace: its bridge and its link to this machine
        supervisor_port=0,
        **zmq, **sentinel_settings(cfg, addr))


def sentinel_settings(cfg, addr: dict[str, str]) -> dict:
    """``redis_sentinels`` (and the web tier reading from the replica) when the stack has Sentinels."""
    if "data2" not in addr:
        return {}
    hosts = ("data", "data2", "front")
    return {"redis_sentinels": ",".join(f"{addr[h]}:{SENTINEL_PORT}" for h in hosts), "web_redis_replica": True}


def sentinel_text(cfg, lay: stack.Layout, primary: str, password: str, address: str) -> str:
    """The configuration of one Sentinel (0600: it holds the Redis password; Sentinel rewrites it)."""
    name = cfg["redis_master_name"]
    return "\n".join([
        "# redis-sentinel of minard up --hosts N --sentinels (docs/deploy.md, \"Several hosts\")",
        f"port {SENTINEL_PORT}", f"bind 127.0.0.1 {address}", "protected-mode no", "daemonize no",
        'logfile ""', f"dir {lay.redis}",
        f"sentinel monitor {name} {primary} {stack.redis_port(cfg)} 2",
        f"sentinel auth-pass {name} {password}",
        f"sentinel down-after-milliseconds {name} 1000",
        f"sentinel failover-timeout {name} 10000",
        f"sentinel parallel-syncs {name} 1", ""])


def host_config(base, lay: stack.Layout):
    """*base* with the paths of one host."""
    return base.replace(
        var_dir=str(lay.var), supervisor_socket=str(lay.socket), programs_file=str(lay.programs_cfg),
        log_dir=str(lay.var / "logs"), stack_dir=str(lay.root),
        dispatcher_accounting_dir=str(lay.var / "dispatcher"), record_dir=str(lay.var / "records"))


def host_commands(hcfg, lay: stack.Layout, shared: stack.Layout, address: str,
                  replica_of: str | None = None) -> dict[str, list[str]]:
    """Command lines that differ from the one-host stack's: the data files are shared, peers are remote."""
    data = stack.commands(hcfg, shared)
    redis = [stack.binary("redis-server"), str(lay.redis_conf), "--bind", "127.0.0.1", address]
    if replica_of:
        redis += ["--replicaof", replica_of, str(stack.redis_port(hcfg))]
    return {
        "replay": _set_option(data["replay"], "--dispatcher", f"{hcfg['dispatcher_host']}:{hcfg['dispatcher_port']}"),
        "orca_replay": _set_option(data["orca_replay"], "--host", str(hcfg["orca_host"])),
        # the data host's Redis also listens on its network address (password and ACL users: redis-auth.conf)
        "redis": redis,
        "redis_sentinel": [stack.binary("redis-sentinel"), str(lay.root / "sentinel.conf"), "--sentinel"],
    }


def ensure_login(scfg, path: Path) -> tuple[str, str]:
    """A shift-crew login for the website: kept in *path* (0600) while it still verifies."""
    from minard.ops.keys import KeyStore

    store = KeyStore.from_config(scfg)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if store.verify(saved["user"], saved["password"], kind="user"):
            return saved["user"], saved["password"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    password = store.add(LOGIN_USER, kind="user", replace=True)
    stack.write_private(path, json.dumps({"user": LOGIN_USER, "password": password}) + "\n")
    return LOGIN_USER, password


def prepare(cfg, root: Path, plans: list[HostPlan], addr: dict[str, str], stack_id: str, echo=click.echo):
    """Shared secrets and data, then each host's directory and rendered configurations.

    Returns the shared configuration.  umask 027 as for one host (files 0640/0600).
    """
    os.umask(0o027)
    shared = stack.Layout(Path(root))
    for d in (shared.root, shared.data, shared.var):
        d.mkdir(parents=True, exist_ok=True, mode=0o750)
    shared.secrets.mkdir(mode=0o700, exist_ok=True)
    os.chmod(shared.secrets, 0o700)
    url_password = urllib.parse.urlsplit(str(cfg["redis_url"])).password
    password = urllib.parse.unquote(url_password) if url_password else stack.secret_file(shared.redis_password)
    users = stack.ensure_redis_users(shared)
    base = shared_config(cfg, shared, password, addr)
    logs = {p: host_layout(root, h.name).logs for h in reversed(plans) for p in h.programs}
    where = {p: f"{h.name} ({addr[h.name]})" for h in reversed(plans) for p in h.programs}
    stack.write_public(shared.programs_cfg, stack.programs_text(cfg, shared, logs, where))
    stack.ensure_data(cfg, shared, echo)
    stack.ensure_tokens(base, shared, known=stack.ensure_dispatcher_credentials(base, shared))
    if not curve.insecure(base):
        curve.ensure_keys(curve.keys_dir(base))
    from minard.store import acl

    for h in plans:
        lay = host_layout(root, h.name)
        for d in (lay.root, lay.run, lay.logs, lay.var, lay.redis, lay.nginx):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
        os.chmod(lay.run, 0o700)
        hcfg = host_config(base, lay)
        stack.write_private(lay.minard_conf, stack.config_text(hcfg))
        stack.write_public(lay.programs_cfg, stack.programs_text(cfg, lay, logs, where))
        if "redis" in h.programs:
            auth = stack.render(stack.template("redis-auth.conf.in"), {
                "redis_password": password, "redis_users": acl.config_lines(users)})
            if "data2" in addr:  # a demoted primary must be able to follow the new one
                auth += f"masterauth {password}\n"
            stack.write_private(lay.redis_auth, auth)
            stack.write_public(lay.redis_conf, stack.redis_text(hcfg, lay))
        if "redis_sentinel" in h.programs:
            stack.write_private(lay.root / "sentinel.conf", sentinel_text(cfg, lay, addr["data"], password, addr[h.name]))
        if "nginx" in h.programs:
            stack.write_public(lay.nginx_conf, stack.nginx_text(hcfg, lay))
        programs = tuple(p for p in ALL_PROGRAMS if p.name in h.programs)
        overrides = host_commands(hcfg, lay, shared, addr[h.name], addr["data"] if h.name == "data2" else None)
        stack.write_private(lay.supervisord_conf, stack.supervisord_text(
            hcfg, lay, f"{stack_id}.{h.name}", None, programs, {k: v for k, v in overrides.items() if k in h.programs}))
        stack.write_public(lay.id_file, f"{stack_id}.{h.name}\n")
        for f in lay.run.glob("*.pgid"):
            f.unlink()
    stack.tighten_modes(Path(root))
    return base


# ----------------------------------------------------------------- network


def free_net() -> int:
    """A third octet whose 198.18/198.19 networks no interface of this machine uses yet."""
    used = netns.used_nets()
    for net in range(18, 250):
        if net not in used:
            return net
    raise click.ClickException("no free 198.18.x.0/24 network left on this machine")


def make_network(plans: list[HostPlan], tag: str) -> tuple[netns.Network, dict[str, netns.Host], tuple[str, str]]:
    """The namespaces, the bridge and the link to this machine; everything made is removed on failure."""
    try:
        net = netns.Network(tag, free_net(), prefix=PREFIX)
    except subprocess.CalledProcessError as exc:
        netns.remove([f"{PREFIX}hub{tag}"])
        raise click.ClickException(f"cannot create network namespaces: {(exc.stderr or '').strip()}") from None
    try:
        hosts = {h.name: net.add_host(h.name) for h in plans}
        link = net.link_root(hosts["front"])
    except subprocess.CalledProcessError as exc:
        net.close()
        raise click.ClickException(f"cannot create the hosts' namespaces and links: {(exc.stderr or '').strip()}") \
            from None
    return net, hosts, link


#: Longest path of a unix socket (sun_path of AF_UNIX, with its terminating NUL).
SOCKET_PATH_MAX = 107


def check_socket_paths(root: Path, plans: list[HostPlan]) -> None:
    """Refuse, before anything is made, a directory so deep that supervisord could not open its socket."""
    longest = max((host_layout(root, h.name).socket for h in plans), key=lambda p: len(str(p)))
    if len(str(longest)) > SOCKET_PATH_MAX:
        raise click.ClickException(f"{longest} is longer than a unix socket path may be ({SOCKET_PATH_MAX}): "
                                   "use a shorter --dir")


def write_state(root: Path, state: dict) -> None:
    """Record the stack (names of namespaces and links, hosts) in hosts.json (0640)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    stack.write_public(state_path(root), json.dumps(state, indent=1) + "\n")


def url(state: dict, cfg) -> str:
    """The dashboard's address from this machine (the front host's end of the link)."""
    return f"http://{state['front_address']}:{int(cfg['nginx_port'])}/"


# ----------------------------------------------------------------- up / down / status


def start_host(root: Path, name: str, ns: str, host_id: str) -> subprocess.Popen:
    """Start host *name*'s supervisord inside its namespace (``ip netns exec`` execs: same pid)."""
    lay = host_layout(root, name)
    with open(lay.logs / "supervisord.out", "ab") as out:
        return subprocess.Popen(["ip", "netns", "exec", ns, stack.binary("supervisord"), "-c", str(lay.supervisord_conf)],
                                env=stack.clean_env(host_id), cwd=str(ROOT), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def not_running(root: Path, state: dict) -> list[str]:
    """``host/program (STATE)`` of every program not RUNNING (a host whose supervisord does not answer too)."""
    bad = []
    for name in host_order(state):
        try:
            bad += [f"{name}/{r['name']} ({r['state']})" for r in stack.process_rows(host_layout(root, name))
                    if r["state"] != "RUNNING"]
        except Exception:  # noqa: BLE001 - no socket yet, refused: not running
            bad.append(f"{name}/supervisord (not answering)")
    return bad


def wait_up(root: Path, state: dict, cfg, procs: dict[str, subprocess.Popen], timeout: float) -> list[str]:
    """Wait until every program of every host runs and nginx answers from this machine; [] or what is not."""
    deadline = time.monotonic() + timeout
    bad = ["(not checked yet)"]
    while time.monotonic() < deadline:
        dead = [f"{n}/supervisord (exited {p.returncode})" for n, p in procs.items() if p.poll() is not None]
        if dead:
            return dead
        bad = not_running(root, state)
        if not bad:
            try:
                with urllib.request.urlopen(url(state, cfg) + "healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return []
            except OSError:
                bad = ["front/nginx (no answer from this machine yet)"]
        time.sleep(0.3)
    return bad


def up(cfg, root: Path, n: int, sentinels: bool = False, echo=click.echo) -> int:
    """Start an *n*-host stack in *root* (or report the one running); return an exit status."""
    root = Path(root).resolve()
    reason = netns.available()
    if reason:
        raise click.ClickException(f"minard up --hosts {n} cannot create network namespaces: {reason}")
    if cfg["nginx_tls"]:
        raise click.ClickException("minard up --hosts serves plain HTTP on the front host's link; turn nginx_tls off")
    state = read_state(root)
    if state is not None:
        if not not_running(root, state):
            echo(f"the {len(state['hosts'])}-host minard stack in {root} is already running")
            show(root, state, cfg, echo)
            return 0
        echo(f"an earlier multi-host stack in {root} is not (fully) running: taking it down first")
        if down(root, echo=echo) != 0:
            return 1
    if stack.supervisord_running(stack.Layout(root)):
        raise click.ClickException(f"a one-host stack runs in {root}: minard down first, or use another --dir")
    try:
        plans = plan(n, sentinels)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    check_socket_paths(root, plans)
    stack_id = secrets.token_hex(4)
    net, hosts, (root_address, front_address) = make_network(plans, stack_id[:4])
    state = {"id": stack_id, "net": net.net, **net.names(), "root_address": root_address,
             "front_address": front_address,
             "hosts": [{"name": h.name, "role": h.role, "ns": hosts[h.name].ns, "address": hosts[h.name].address,
                        "programs": list(h.programs)} for h in plans]}
    write_state(root, state)
    try:
        echo(f"preparing {n} hosts in {root} (network 198.18.{net.net}.0/24)")
        base = prepare(cfg, root, plans, {h: hosts[h].address for h in hosts}, stack_id, echo)
        ensure_login(base, stack.Layout(root).secrets / "web_login.json")
        procs = {}
        for h in plans:
            procs[h.name] = start_host(root, h.name, hosts[h.name].ns, f"{stack_id}.{h.name}")
            echo(f"  {h.name:<14} {hosts[h.name].address:<15} {', '.join(h.programs)}")
    except BaseException:
        down(root, echo=echo)
        raise
    bad = wait_up(root, state, cfg, procs, float(cfg["stack_start_timeout"]))
    if bad:
        echo(f"not running after {cfg['stack_start_timeout']}s: {', '.join(bad)}; see {root}/hosts/*/logs",
             err=True)
        return 1
    echo(f"minard is up on {n} hosts")
    show(root, state, cfg, echo)
    return 0


def show(root: Path, state: dict, cfg, echo) -> None:
    """Print the dashboard's URL, the login and how to reach the other hosts."""
    login = stack.Layout(root).secrets / "web_login.json"
    echo(f"open {url(state, cfg)}  (this machine {state['root_address']} <-> front host {state['front_address']})")
    if login.exists():
        saved = json.loads(login.read_text(encoding="utf-8"))
        echo(f"  shift-crew login: {saved['user']} / {saved['password']}  (kept in {login}, 0600)")
    data = next(h for h in state["hosts"] if h["name"] == "data")
    echo(f"  minard status / minard down --dir {root}   show / stop every host")
    echo(f"  on a host: ip netns exec {data['ns']} minard --config {host_layout(root, 'data').minard_conf} stats")


def _stop_host(root: Path, name: str, echo) -> int:
    """Stop one host's supervisord and every process of it (minard.stack.down), quietly unless it fails."""
    lines: list[tuple[str, bool]] = []
    code = stack.down(host_layout(root, name), echo=lambda msg, err=False: lines.append((msg, err)))
    for msg, err in lines:
        if err or code:
            echo(f"  {name}: {msg}", err=True)
    return code


def down(root: Path, echo=click.echo) -> int:
    """Stop every host (sources first, Redis last), then remove the namespaces and the link by name."""
    root = Path(root).resolve()
    state = read_state(root)
    if state is None:
        echo(f"no multi-host stack recorded in {root}")
        return 0
    echo(f"stopping the {len(state['hosts'])}-host minard stack in {root}")
    names = host_order(state)
    code = 0
    for wave in STOP_WAVES:
        members = [n for n in names if any(n.startswith(w) for w in wave)]
        with ThreadPoolExecutor(max(1, len(members))) as pool:
            code |= max([0, *pool.map(lambda n: _stop_host(root, n, echo), members)])
    for ns in state["namespaces"]:
        left = netns.namespace_pids(ns)
        if left:
            killed = stack.kill_pids(left)
            echo(f"  {len(left)} process(es) still in {ns}: {left}; stopped ({len(killed)} with SIGKILL)")
    remaining = [p for ns in state["namespaces"] for p in netns.namespace_pids(ns)]
    left = netns.remove(state["namespaces"], state["links"])
    if remaining or left:
        echo(f"left behind: processes {remaining}, namespaces/links {left}", err=True)
        return 1
    state_path(root).unlink(missing_ok=True)
    echo(f"minard is down: no process, namespace ({len(state['namespaces'])}) or link of the stack is left")
    return code


def status(root: Path) -> int:
    """Print every host's processes (host/name, state, pid, uptime); 0 if all run, 1 if not, 3 if none is recorded."""
    state = read_state(root)
    if state is None:
        click.echo(f"no multi-host stack in {root}")
        return 3
    ok = True
    width = max(len(h["name"]) + 1 + len(p) for h in state["hosts"] for p in [*h["programs"], "supervisord"])
    for h in state["hosts"]:
        try:
            rows = stack.process_rows(host_layout(root, h["name"]))
        except Exception as exc:  # noqa: BLE001 - its supervisord does not answer
            click.echo(stack.status_table([{"name": f"{h['name']}/supervisord", "state": "DOWN", "pid": None,
                                            "uptime": None, "description": str(exc)}], width))
            ok = False
            continue
        click.echo(stack.status_table([{**r, "name": f"{h['name']}/{r['name']}"} for r in rows], width))
        ok = ok and all(r["state"] == "RUNNING" for r in rows)
    return 0 if ok else 1
