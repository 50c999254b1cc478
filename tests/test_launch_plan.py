"""Launch plans: the built-in plan, and errors that name the file, the key and the expectation."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

import pytest
import yaml

from cei_actors.launch.plan import DEFAULT_SOURCE, PlanError, load_plan


def write(tmp_path: Path, data: object, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def default_data() -> dict:
    from cei_actors.launch.plan import default_plan_text

    return yaml.safe_load(default_plan_text())


def test_default_plan(tmp_path):
    plan = load_plan(None, home=tmp_path)
    assert plan.source == DEFAULT_SOURCE
    base, query = plan.log_url.split("?")
    assert base == f"sqlite:///{tmp_path.resolve()}/log.sqlite"
    assert dict(parse_qsl(query)) == {"archive": f"sqlite:///{tmp_path.resolve()}/archive.sqlite",
                                      "keep_snapshots": "2"}
    assert {c: p.replicas for c, p in plan.components.items()} == {"provisioner": 1, "epum": 1, "pd": 1, "ha": 1}
    site = plan.registry["sites"]["local"]
    assert site["type"] == "local" and site["state_dir"] == f"{tmp_path.resolve()}/nodes"
    assert "--pd {admin} " in site["command"]
    pd = plan.start_config("pd")
    assert pd["engines"] == {"default": {"slots": 4, "maximum_vms": 4, "heartbeat_period": 1,
                                         "heartbeat_warning": 3, "heartbeat_missing": 5}}
    epum = plan.start_config("epum")
    assert epum["initial_definitions"] == {"pd_default": {"general": {"engine_class": "needy"}}}
    assert plan.static_nodes == ()


def test_log_override_and_home(tmp_path):
    plan = load_plan(None, home=tmp_path / "h", log_url="zk://127.0.0.1:2181/cei")
    assert plan.log_url.split("?")[0] == "zk://127.0.0.1:2181/cei"
    assert plan.registry["sites"]["local"]["state_dir"].endswith("/h/nodes")


def test_a_copy_of_the_default_plan_loads(tmp_path):
    path = write(tmp_path, default_data())
    assert load_plan(path, home=tmp_path).source == str(path)


def test_static_plan_needs_no_epum_or_provisioner(tmp_path):
    path = write(tmp_path, {"log": "sqlite:///${home}/l.db", "components": {"pd": {}},
                            "pd": {"engines": {"e": {"slots": 2}}},
                            "static_nodes": [{"node_id": "n1"}, {"node_id": "n2", "slots": 3}]})
    plan = load_plan(path, home=tmp_path)
    assert [(n.node_id, n.engine, n.slots) for n in plan.static_nodes] == [("n1", "e", 2), ("n2", "e", 3)]
    assert plan.start_config("pd")["static_resources"] is True


def mutate(tmp_path, change):
    data = default_data()
    change(data)
    return write(tmp_path, data)


@pytest.mark.parametrize(
    "change, key, expected",
    [
        (lambda d: d.update(colour="red"), "colour", "unknown key"),
        (lambda d: d.update(log="file.db"), "log", "expected a log URL"),
        (lambda d: d["components"]["pd"].update(replicas=0), "components.pd.replicas",
         "expected an integer >= 1"),
        (lambda d: d["components"]["pd"].update(replica=2), "components.pd.replica", "unknown key"),
        (lambda d: d["components"].update(scheduler={}), "components.scheduler", "unknown key"),
        (lambda d: d["components"]["pd"]["config"].update(dispatch_retry=1),
         "components.pd.config", "unknown keys ['dispatch_retry']"),
        (lambda d: d["components"]["epum"]["config"].update(decider=1),
         "components.epum.config", "unknown key(s) decider"),
        (lambda d: d["components"]["ha"]["config"].update(poll=1),
         "components.ha.config", "unknown key(s) poll"),
        (lambda d: d["components"]["provisioner"]["config"].update(query=1),
         "components.provisioner.config", "unknown provisioner config key(s): query"),
        (lambda d: d["pd"]["engines"]["default"].update(slots=0), "pd.engines.default",
         "slots must be an int >= 1"),
        (lambda d: d["pd"]["engines"]["default"].pop("heartbeat_missing"), "pd.engines.default",
         "heartbeat_warning and heartbeat_missing go together"),
        (lambda d: d["pd"].update(engines={}), "pd.engines", "at least one engine"),
        (lambda d: d["registry"]["sites"]["local"].update(colour=1),
         "registry.sites.local.colour", "unknown key 'colour'"),
        (lambda d: d["registry"]["sites"]["local"].pop("command"),
         "registry.sites.local.command", "missing key 'command'"),
        (lambda d: d["registry"]["deployable_types"]["eeagent"].update(maps={}),
         "registry.deployable_types.eeagent", "unknown key 'maps'"),
        (lambda d: d["registry"].update(credentials={"ec2": {"access_key": "a"}}),
         "registry.credentials.ec2", "a site of registry.sites"),
        (lambda d: d.update(static_nodes=[{"node_id": "n", "engine": "x"}]),
         "static_nodes.0.engine", "one of the pd.engines"),
        (lambda d: d.update(static_nodes=[{"node_id": "n"}, {"node_id": "n"}]),
         "static_nodes.1.node_id", "unique node id"),
        (lambda d: d["epum"].update(domains={"d": {"config": {}}}), "epum.domains.d.definition",
         "expected the id of a domain definition"),
        (lambda d: d.update(components={}), "components", "at least one of"),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path, change, key, expected):
    path = mutate(tmp_path, change)
    with pytest.raises(PlanError) as err:
        load_plan(path, home=tmp_path)
    assert err.value.key == key
    assert expected in str(err.value)
    assert str(err.value).startswith(f"{path}: {key}: ")


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(PlanError, match="cannot read the plan"):
        load_plan(tmp_path / "missing.yaml", home=tmp_path)
    with pytest.raises(PlanError, match="expected YAML"):
        load_plan(write(tmp_path, "log: [unclosed"), home=tmp_path)
    with pytest.raises(PlanError, match=r"\(top level\): expected a mapping, got list"):
        load_plan(write(tmp_path, "- 1\n- 2\n"), home=tmp_path)


def test_secrets_in_the_plan_are_files_only_their_owner_may_read(tmp_path):
    """The credentials key defaults to HOME/credentials.key; a ZooKeeper credentials file
    named by the log URL must be 0600 (checked at load, never echoing its contents)."""
    plan = load_plan(None, home=tmp_path)
    assert plan.start_config("provisioner")["credentials_key_file"] == str(
        tmp_path.resolve() / "credentials.key")
    auth = tmp_path / "zk.auth"
    auth.write_text("cei:hunter2")
    auth.chmod(0o644)
    url = f"zk://127.0.0.1:2181/cei?auth_file={auth}"
    with pytest.raises(PlanError, match="chmod 600") as info:
        load_plan(None, home=tmp_path, log_url=url)
    assert info.value.key == "log" and "hunter2" not in str(info.value)
    auth.chmod(0o600)
    assert load_plan(None, home=tmp_path, log_url=url).log_url.startswith(url + "&archive=")


def test_session_timeout_goes_into_a_zookeeper_log_url(tmp_path):
    data = default_data()
    data["session_timeout"] = 3
    data["log_history"] = {"archive": "none"}  # its options are the next test's
    path = write(tmp_path, data)
    plan = load_plan(path, home=tmp_path, log_url="zk://127.0.0.1:2181/cei?timeout=5")
    assert plan.log_url == "zk://127.0.0.1:2181/cei?timeout=5&session_timeout=3"
    assert load_plan(path, home=tmp_path, log_url="zk://h:1/c").log_url == "zk://h:1/c?session_timeout=3"
    assert load_plan(path, home=tmp_path, log_url="zk://h:1/c?session_timeout=3.0").log_url.count("session") == 1
    # SQLite: the kernel frees a dead leader's lock at once; nothing to set
    assert load_plan(path, home=tmp_path).log_url == f"sqlite:///{tmp_path.resolve()}/log.sqlite"
    with pytest.raises(PlanError, match="session_timeout: 3, but the log URL sets session_timeout=7"):
        load_plan(path, home=tmp_path, log_url="zk://h:1/c?session_timeout=7")
    for bad in (0, -1, "4s", True):
        data["session_timeout"] = bad
        with pytest.raises(PlanError, match="session_timeout: expected a number of seconds > 0"):
            load_plan(write(tmp_path, data), home=tmp_path)



def test_log_history_becomes_the_log_urls_options(tmp_path):
    """log_history's archive and keep_snapshots are options of the log URL (so every reader of
    the log, `cei log` too, finds the archive); the URL's own options win; bad values are named."""
    def plan_with(history, log="sqlite:///${home}/log.sqlite"):
        path = tmp_path / "plan.yaml"
        data = default_data()
        data["log"] = log
        data["log_history"] = history
        path.write_text(yaml.safe_dump(data))
        return load_plan(path, home=tmp_path)

    url = plan_with({"archive": "${home}/archive", "keep_snapshots": 3}).log_url
    assert dict(parse_qsl(url.split("?")[1])) == {"archive": f"{tmp_path.resolve()}/archive",
                                                  "keep_snapshots": "3"}
    assert "?" not in plan_with({"archive": "none"}).log_url
    url = plan_with({"archive": "/elsewhere"}, log="zk://127.0.0.1:2181/cei?archive=/mine").log_url
    assert dict(parse_qsl(url.split("?")[1])) == {"archive": "/mine"}
    assert plan_with({}, log="memory://x").log_url == "memory://x"
    with pytest.raises(PlanError, match="absolute") as info:
        plan_with({"archive": "relative/dir"})
    assert info.value.key == "log_history.archive"
    with pytest.raises(PlanError) as info:
        plan_with({"keep_snapshots": 0})
    assert info.value.key == "log_history.keep_snapshots"
    with pytest.raises(PlanError) as info:
        plan_with({"keep": 1})
    assert info.value.key == "log_history.keep"
