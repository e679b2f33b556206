import pytest

from runner.errors import HiveError
from runner.hive.model import NodeConfig, UploadAt


def key(**kw):
    base = {
        "name": "k",
        "destDir": "/run/keys",
        "path": "/run/keys/k",
        "user": "root",
        "group": "root",
        "permissions": "0600",
        "uploadAt": "pre-activation",
        "text": None,
        "keyFile": None,
        "keyCommand": None,
    }
    base.update(kw)
    return base


def node(**keys):
    return {
        "targetHost": "h",
        "targetPort": None,
        "targetUser": "root",
        "tags": ["a"],
        "keys": keys,
    }


def test_defaults_and_key_sources():
    cfg = NodeConfig.from_json(
        "n",
        node(
            a=key(text="s", name="a", path="/run/keys/a"),
            b=key(keyFile="/f", uploadAt="post-activation", name="b", path="/run/keys/b"),
            c=key(keyCommand=["echo", "x"], name="c", path="/run/keys/c"),
        ),
    )
    assert [k.source.kind for k in cfg.keys] == ["text", "keyFile", "keyCommand"]
    assert cfg.keys[1].upload_at is UploadAt.POST_ACTIVATION
    assert cfg.privilege_escalation_command == ("sudo", "-H", "--")
    assert "s" not in repr(cfg.keys[0].source)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (key(text="a", keyFile="/b"), "exactly one of text, keyFile and keyCommand"),
        (key(), "exactly one"),
        (key(text="a", name="../x"), "single path component"),
        (key(text="a", destDir="relative"), "absolute"),
        (key(text="a", user="Bad User"), "not a valid user"),
        (key(text="a", permissions="rw"), "octal"),
        (key(keyCommand="echo"), "non-empty list"),
        (key(text="a", uploadAt="later"), "uploadAt"),
    ],
)
def test_bad_keys_name_node_and_key(data, message):
    with pytest.raises(HiveError, match=message) as e:
        NodeConfig.from_json("web-1", node(secret=data))
    assert "node web-1: deployment.keys.secret" in str(e.value)


def test_key_attribute_with_slash():
    with pytest.raises(HiveError, match="single path component"):
        NodeConfig.from_json("n", node(**{"a/b": key(text="x")}))


def test_two_keys_with_one_path_name_both():
    with pytest.raises(HiveError) as e:
        NodeConfig.from_json(
            "web-1",
            node(
                a=key(text="1", name="x", path="/run/keys/x"),
                b=key(text="2", name="x", destDir="/run//keys/", path="/run//keys//x"),
                c=key(text="3", name="x", destDir="/srv", path="/srv/x"),
            ),
        )
    assert str(e.value) == (
        "node web-1: deployment.keys.a and deployment.keys.b are both written to /run/keys/x"
    )
