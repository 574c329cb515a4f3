"""Flag parsers and BuildOptions (pure logic, no server)."""

import os

import pytest

from bkdbg.errors import UsageError
from bkdbg.options import (
    BuildOptions,
    InvokeConfig,
    OutputSpec,
    SecretSpec,
    TLSConfig,
    parse_add_host,
    parse_build_arg,
    parse_build_context,
    parse_choice,
    parse_duration,
    parse_invoke,
    parse_label,
    parse_output,
    parse_platforms,
    parse_secret,
    parse_ssh,
    resolve_build_paths,
    split_csv,
)


def error_of(func, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as info:
        func(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- --invoke


@pytest.mark.parametrize(
    ("value", "entrypoint", "args"),
    [
        ("sh", ["sh"], []),
        ('sh -c "ls /"', ["sh"], ["-c", "ls /"]),
        ("/bin/busybox ls -l /", ["/bin/busybox"], ["ls", "-l", "/"]),
    ],
)
def test_invoke_command_forms(value, entrypoint, args):
    config = parse_invoke(value)
    assert config.entrypoint == entrypoint
    assert config.args == args
    assert config.tty is True
    assert config.use_image_default is False


def test_invoke_default_uses_image():
    config = parse_invoke("default", on="error")
    assert config.use_image_default is True
    assert config.on == "error"


def test_invoke_csv_form():
    config = parse_invoke("entrypoint=sh,args=-c,args=id,env=A=1,user=nobody,cwd=/tmp,tty=false")
    assert config.entrypoint == ["sh"]
    assert config.args == ["-c", "id"]
    assert config.env == ["A=1"]
    assert config.user == "nobody"
    assert config.cwd == "/tmp"
    assert config.tty is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "invalid --invoke value: '': give a command such as sh"),
        ('sh -c "unclosed', "invalid --invoke value: 'sh -c \"unclosed': No closing quotation"),
        ("entrypoint=sh,bogus=1", "unknown field 'bogus=1'"),
        ("entrypoint=sh,tty=maybe", "tty must be true or false"),
        ("args=sh,env=FOO", "invalid --invoke value: 'args=sh,env=FOO': env needs KEY=VALUE"),
        ("args=sh,env==1", "invalid --invoke value: 'args=sh,env==1': env needs KEY=VALUE"),
        ("args=", "invalid --invoke value: 'args=': give a command"),
        ("entrypoint=,args=id", "invalid --invoke value: 'entrypoint=,args=id': give a command"),
    ],
)
def test_invoke_errors(value, expected):
    assert expected in error_of(parse_invoke, value)


def test_invoke_bad_on():
    assert error_of(parse_invoke, "sh", on="sometimes") == (
        "invalid --on value: 'sometimes': use always or error"
    )


# ---------------------------------------------------------------- key=value flags


def test_build_arg_value_and_environment():
    assert parse_build_arg("A=1") == ("A", "1")
    assert parse_build_arg("A=") == ("A", "")
    assert parse_build_arg("HTTP_PROXY", {"HTTP_PROXY": "http://p"}) == ("HTTP_PROXY", "http://p")


def test_build_arg_errors():
    assert error_of(parse_build_arg, "=1") == "invalid --build-arg value: '=1': expected KEY=VALUE"
    assert error_of(parse_build_arg, "NOPE", {}) == (
        "invalid --build-arg value: 'NOPE': no '=' and NOPE is not set in the environment: "
        "give NOPE=VALUE or export NOPE"
    )


def test_label():
    assert parse_label("a=b=c") == ("a", "b=c")
    assert error_of(parse_label, "a") == "invalid --label value: 'a': expected KEY=VALUE"


def test_build_context_dir_and_image(tmp_path):
    assert parse_build_context(f"lib={tmp_path}") == ("lib", str(tmp_path))
    assert parse_build_context("base=docker-image://alpine:3") == (
        "base",
        "docker-image://alpine:3",
    )


def test_build_context_errors(tmp_path):
    missing = tmp_path / "missing"
    assert error_of(parse_build_context, f"lib={missing}") == (
        f"build context directory not found: {missing}: check --build-context 'lib={missing}'"
    )
    assert "expected NAME=DIR" in error_of(parse_build_context, "lib")


def test_add_host():
    assert parse_add_host("db:10.0.0.5") == "db:10.0.0.5"
    assert parse_add_host("db=10.0.0.5") == "db:10.0.0.5"
    assert "expected HOST:IP" in error_of(parse_add_host, "db")


def test_platforms():
    assert parse_platforms("linux/amd64,linux/arm64/v8") == ["linux/amd64", "linux/arm64/v8"]
    assert error_of(parse_platforms, "amd64") == (
        "invalid --platform value: 'amd64': expected OS/ARCH[/VARIANT], e.g. linux/amd64"
    )


def test_choice():
    assert parse_choice("plain", "--progress", ("auto", "plain")) == "plain"
    assert error_of(parse_choice, "fancy", "--progress", ("auto", "plain")) == (
        "invalid --progress value: 'fancy': use one of auto, plain"
    )


def test_split_csv_quotes_and_repeats():
    # as in Go's encoding/csv, which buildx uses, a quote opens only at the start of a field
    assert split_csv('type=local,"dest=a,b",x=1,x=2', "--output") == {
        "type": "local",
        "dest": "a,b",
        "x": "1,2",
    }
    assert "expected comma-separated key=value pairs" in error_of(split_csv, "novalue", "--output")


# ---------------------------------------------------------------- secrets, ssh, outputs


def test_secret_file(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret")
    spec = parse_secret(f"id=tok,src={token}")
    assert spec == SecretSpec(id="tok", src=str(token))
    assert "s3cret" not in repr(spec)


def test_secret_env_value_kept_out_of_repr():
    spec = parse_secret("id=tok,env=TOKEN", {"TOKEN": "s3cret"})
    assert spec.env == "TOKEN"
    assert spec.value == "s3cret"
    assert "s3cret" not in repr(spec)


def test_secret_errors(tmp_path):
    missing = tmp_path / "nope"
    assert error_of(parse_secret, f"id=a,src={missing}") == (
        f"secret file not found: {missing}: check --secret 'id=a,src={missing}'"
    )
    assert error_of(parse_secret, "id=a,env=UNSET", {}) == (
        "secret environment variable not set: UNSET: export it or use src=PATH"
    )
    assert "unknown key 'colour'" in error_of(parse_secret, "id=a,colour=red")


def test_ssh(tmp_path):
    assert parse_ssh("default", {"SSH_AUTH_SOCK": "/run/agent"}).paths == ["/run/agent"]
    assert parse_ssh(f"key={tmp_path}/id").paths == [f"{tmp_path}/id"]
    assert "SSH_AUTH_SOCK is not set" in error_of(parse_ssh, "default", {})


def test_output_forms(tmp_path):
    assert parse_output("-") == OutputSpec("tar", {"dest": "-"})
    assert parse_output(str(tmp_path)) == OutputSpec("local", {"dest": str(tmp_path)})
    assert parse_output("type=image,name=x/y").attrs == {"name": "x/y"}


def test_output_errors():
    assert "type must be one of" in error_of(parse_output, "type=zip,dest=a")
    assert error_of(parse_output, "type=local") == (
        "invalid --output value: 'type=local': type=local needs dest=PATH"
    )


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("", None), ("0", None), ("45", 45.0), ("30s", 30.0), ("10m", 600.0), ("1h30m", 5400.0)],
)
def test_duration(value, seconds):
    assert parse_duration(value, "--server-idle-timeout") == seconds


@pytest.mark.parametrize("value", ["10 minutes", "m", "-5", "1d"])
def test_duration_errors(value):
    assert error_of(parse_duration, value, "--server-idle-timeout").startswith(
        f"invalid --server-idle-timeout value: {value!r}: "
    )


# ---------------------------------------------------------------- paths


def test_build_paths_default_dockerfile(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    assert resolve_build_paths(str(tmp_path), None) == (str(tmp_path), str(tmp_path / "Dockerfile"))


def test_build_paths_relative_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "ctx").mkdir()
    (tmp_path / "other.Dockerfile").write_text("FROM scratch\n")
    monkeypatch.chdir(tmp_path)
    context, dockerfile = resolve_build_paths("ctx", "other.Dockerfile")
    assert context == str(tmp_path / "ctx")
    assert dockerfile == str(tmp_path / "other.Dockerfile")


def test_build_paths_stdin_dockerfile(tmp_path):
    assert resolve_build_paths(str(tmp_path), "-") == (str(tmp_path), "-")


def test_build_paths_errors(tmp_path):
    missing = tmp_path / "missing"
    assert error_of(resolve_build_paths, str(missing), None) == (
        f"build context not found: {missing}: give an existing directory"
    )
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert error_of(resolve_build_paths, str(a_file), None) == (
        f"build context is not a directory: {a_file}: give the directory that contains "
        "the Dockerfile"
    )
    assert error_of(resolve_build_paths, str(tmp_path), None) == (
        f"Dockerfile not found: {tmp_path / 'Dockerfile'}: create it or pass -f PATH"
    )


# ---------------------------------------------------------------- JSON


def test_build_options_json_round_trip(tmp_path):
    options = BuildOptions(
        context=str(tmp_path),
        build_args={"A": "1"},
        secrets=[SecretSpec(id="s", env="S", value="v")],
        outputs=[OutputSpec("local", {"dest": "/out"})],
        invoke=InvokeConfig(entrypoint=["sh"], args=[], tty=False),
        addr="unix:///run/buildkit/buildkitd.sock",
        tls=TLSConfig(ca="/ca.pem", server_name="bk"),
    )
    assert BuildOptions.from_json(options.to_json()) == options


def test_build_options_json_without_tls():
    options = BuildOptions(context=os.getcwd())
    decoded = BuildOptions.from_json(options.to_json())
    assert decoded.tls is None
    assert decoded.addr is None
