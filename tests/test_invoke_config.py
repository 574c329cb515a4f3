"""process_config: which command, env, cwd and user an invoke gets (no BuildKit needed)."""

import pytest

from bkdbg.errors import FailedStep, UsageError
from bkdbg.gateway.invoke import merge_env, process_config
from bkdbg.options import InvokeConfig, parse_invoke

IMAGE = {
    "os": "linux",
    "architecture": "amd64",
    "config": {
        "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
        "Entrypoint": ["/entry.sh"],
        "Cmd": ["serve", "--port", "80"],
        "WorkingDir": "/app",
        "User": "app",
    },
}
STEP = FailedStep(
    message="exit code: 7",
    exit_code=7,
    command=["/bin/sh", "-c", "make test"],
    env=["PATH=/bin", "FOO=bar"],
    cwd="/work",
    user="builder",
    is_exec=True,
)


def config(invoke, image=IMAGE, step=None, tty=False, **kwargs):
    return process_config(invoke, image, step, tty, **kwargs)


@pytest.mark.parametrize(
    ("invoke", "args"),
    [
        ("default", ["/entry.sh", "serve", "--port", "80"]),
        ("sh", ["sh"]),
        ('sh -c "ls /"', ["sh", "-c", "ls /"]),
        ("entrypoint=/bin/bash", ["/bin/bash"]),
        ("entrypoint=/bin/sh,args=-c,args=id", ["/bin/sh", "-c", "id"]),
        ("args=debug", ["/entry.sh", "debug"]),
        ("env=A=1", ["/entry.sh", "serve", "--port", "80"]),
    ],
)
def test_image_args_by_invoke_form(invoke, args):
    assert config(parse_invoke(invoke)).args == args


def test_image_settings_apply_by_default():
    result = config(parse_invoke("sh"))
    assert result.env == ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]
    assert result.cwd == "/app"
    assert result.user == "app"


def test_invoke_overrides_cwd_user_env():
    invoke = parse_invoke("entrypoint=sh,user=root,cwd=/tmp,env=LANG=POSIX,env=NEW=1")
    result = config(invoke)
    assert result.user == "root"
    assert result.cwd == "/tmp"
    assert result.env == ["PATH=/usr/bin:/bin", "LANG=POSIX", "NEW=1"]


def test_empty_user_overrides_image_user():
    result = config(InvokeConfig(entrypoint=["sh"], user=""))
    assert result.user == ""


def test_term_set_only_under_tty():
    assert "TERM=xterm-256color" in config(parse_invoke("sh"), tty=True, term="xterm-256color").env
    assert not any(e.startswith("TERM=") for e in config(parse_invoke("sh"), term="xterm").env)


def test_invoke_env_term_beats_client_term():
    invoke = parse_invoke("entrypoint=sh,env=TERM=dumb")
    env = config(invoke, tty=True, term="xterm").env
    assert [e for e in env if e.startswith("TERM=")] == ["TERM=dumb"]


def test_tty_and_size_are_passed_through():
    result = config(parse_invoke("sh"), tty=True, rows=40, cols=120)
    assert (result.tty, result.rows, result.cols) == (True, 40, 120)


def test_no_image_config():
    result = config(parse_invoke("sh"), image=None)
    assert result.args == ["sh"]
    assert result.env == []
    assert (result.cwd, result.user) == ("", "")


def test_no_command_raises_usage_error():
    with pytest.raises(UsageError, match="no command to run"):
        config(parse_invoke("default"), image={"config": {}})


def test_failed_step_settings():
    result = config(parse_invoke("sh"), step=STEP)
    assert result.args == ["sh"]
    assert result.env == ["PATH=/bin", "FOO=bar"]
    assert result.cwd == "/work"
    assert result.user == "builder"


def test_failed_step_ignores_image_config():
    result = config(parse_invoke("default"), step=STEP)
    assert result.args == ["/bin/sh", "-c", "make test"]
    assert "LANG=C.UTF-8" not in result.env


def test_failed_step_env_only_reruns_command():
    result = config(parse_invoke("env=X=1"), step=STEP)
    assert result.args == STEP.command
    assert result.env == ["PATH=/bin", "FOO=bar", "X=1"]


def test_failed_step_overrides():
    invoke = parse_invoke("entrypoint=sh,cwd=/,user=root")
    result = config(invoke, step=STEP)
    assert (result.cwd, result.user) == ("/", "root")


@pytest.mark.parametrize(
    ("layers", "merged"),
    [
        ([["A=1", "B=2"], ["A=3"]], ["A=3", "B=2"]),
        ([["A=1"], [], ["C=x=y"]], ["A=1", "C=x=y"]),
        ([["A="], ["A=1"]], ["A=1"]),
        ([["BARE"], ["BARE=1"]], ["BARE=1"]),
        ([["BARE"]], ["BARE"]),
    ],
)
def test_merge_env(layers, merged):
    assert merge_env(*layers) == merged
