"""Auto-unseal: the softkms root key wrapped by a Transit key of a real OpenBao server, by a
symmetric AWS KMS key (moto_server), or by an AES key on a SoftHSM2 token."""

from __future__ import annotations

import base64
import resource
import secrets
import subprocess
import sys
from pathlib import Path

import hvac
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from kmsgate.auth import Credentials
from kmsgate.backends.softkms import create_root_key_file
from kmsgate.bootstrap import build_service, init_wrapped_root_key
from kmsgate.config import load_settings
from kmsgate.errors import ConfigError
from kmsgate.service import Ctx
from kmsgate.service.requests import NewKey, SignInput
from tests.softhsm import softhsm_token


@pytest.fixture
def unseal_settings(tmp_path: Path, openbao_server):
    kek = f"root-kek-{secrets.token_hex(4)}"
    openbao_server.client().secrets.transit.create_key(name=kek, key_type="aes256-gcm96")
    token = tmp_path / "vault-token"
    token.write_text(openbao_server.root_token)
    token.chmod(0o600)
    data = tmp_path / "data"
    data.mkdir()

    def settings(kek_name: str = kek):
        return load_settings(
            data_dir=data,
            env="test",
            backends={
                "local": {"type": "softkms"},
                "vault": {
                    "type": "hashivault",
                    "addr": openbao_server.addr,
                    "token_file": str(token),
                    "mount": "transit",
                },
            },
            root_key_wrap={
                "backend": "vault",
                "kek": kek_name,
                "file": str(tmp_path / "root.wrapped"),
            },
        )

    return settings, kek, openbao_server


def test_a_wrapped_root_key_that_cannot_be_written_leaves_nothing(unseal_settings):
    """A write that fails part-way (here the file size limit; a full disk alike): a
    one-line reason naming the file, and no file, so that the next try can write it (an
    empty file under its name was refused as "exists", and was the only copy)."""
    settings, _, _ = unseal_settings
    target = settings().root_key_wrap.file
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, limits[1]))  # the blob is longer
    try:
        with pytest.raises(ConfigError, match=f"cannot write {target}: File too large"):
            init_wrapped_root_key(settings())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert not target.exists()
    assert init_wrapped_root_key(settings()) == target


def test_root_key_survives_restarts_and_kek_rotation(unseal_settings):
    settings, kek, server = unseal_settings
    path = init_wrapped_root_key(settings())
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) > 32  # wrapped, not the bare key
    with pytest.raises(ConfigError, match="exists"):
        init_wrapped_root_key(settings())

    service = build_service(settings())
    bearer = service.tokens.create(["admin"], ttl=None)[1]
    admin = service.gate.authenticate(Credentials(bearer=bearer), Ctx("t"))
    service.keys.create(admin, Ctx("t"), NewKey(name="k", type="ed25519", purpose="p"))
    service.close()

    server.client().secrets.transit.rotate_key(name=kek)
    service = build_service(settings())  # unwraps again, after a KEK rotation
    target = service.gate.target("k")
    [signed] = service.crypto.sign(admin, Ctx("t"), target, [SignInput(input=b"m")], False)
    assert signed.key_version == 1
    service.close()


def test_a_store_sealed_with_a_root_key_file_moves_to_auto_unseal(unseal_settings, tmp_path):
    """`root-key-init --from-file` wraps the root key a store was sealed with, so that the
    plaintext file can go; a new key (which would not open the store), or another key, is
    refused before anything is written."""
    settings, _, _ = unseal_settings
    plain_key, other_key = tmp_path / "root.key", tmp_path / "other.key"
    for path in (plain_key, other_key):
        create_root_key_file(path)
    wrapped = settings()
    plain = load_settings(
        data_dir=wrapped.data_dir, env="test", backends={"local": {"type": "softkms"}},
        root_key_file=plain_key,
    )  # fmt: skip
    service = build_service(plain)
    bearer = service.tokens.create(["admin"], ttl=None)[1]
    admin = service.gate.authenticate(Credentials(bearer=bearer), Ctx("t"))
    service.keys.create(admin, Ctx("t"), NewKey(name="kept", type="ed25519", purpose="p"))
    service.close()
    with pytest.raises(ConfigError, match=r"sealed with a root key already.*--from-file"):
        init_wrapped_root_key(wrapped)
    with pytest.raises(ConfigError, match=f"{other_key} is not the root key this store"):
        init_wrapped_root_key(wrapped, other_key)
    assert not wrapped.root_key_wrap.file.exists()
    init_wrapped_root_key(wrapped, plain_key)
    both = settings().model_copy(update={"root_key_file": plain_key})
    with pytest.raises(ConfigError, match="root_key_file and root_key_wrap are both set"):
        build_service(both)
    plain_key.unlink()  # what the operator does once the gateway starts without it
    service = build_service(settings())
    [signed] = service.crypto.sign(
        admin, Ctx("t"), service.gate.target("kept"), [SignInput(input=b"m")], False
    )
    assert signed.key_version == 1
    service.close()


def test_wrong_or_missing_kek_refuses_to_start(unseal_settings, tmp_path):
    settings, _, server = unseal_settings
    init_wrapped_root_key(settings())
    with pytest.raises(ConfigError, match="wrapping key unavailable"):
        build_service(settings("no-such-kek"))
    other = f"other-{secrets.token_hex(4)}"
    server.client().secrets.transit.create_key(name=other, key_type="aes256-gcm96")
    with pytest.raises(ConfigError, match="cannot unwrap"):
        build_service(settings(other))
    imported = f"imported-{secrets.token_hex(4)}"
    import_transit_key(server.client(), imported, secrets.token_bytes(32))
    with pytest.raises(ConfigError, match="was imported: a copy of it exists outside Vault"):
        build_service(settings(imported))


def import_transit_key(client: hvac.Client, name: str, material: bytes) -> None:
    """Import `material` as the aes256-gcm96 Transit key `name` (BYOK): an ephemeral AES key
    wrapped with RSA-OAEP (SHA-256) under the mount's wrapping key, then the material wrapped
    with it (AES-KWP, RFC 5649)."""
    wrapping = client.adapter.get("/v1/transit/wrapping_key")["data"]["public_key"]
    public = serialization.load_pem_public_key(wrapping.encode())
    assert isinstance(public, rsa.RSAPublicKey)
    ephemeral = secrets.token_bytes(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    blob = public.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, material)
    client.adapter.post(
        f"/v1/transit/keys/{name}/import",
        json={"ciphertext": base64.b64encode(blob).decode(), "type": "aes256-gcm96"},
    )


@pytest.fixture
def aws_unseal_settings(tmp_path: Path, moto_server):
    client = moto_server.client()
    arn = client.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"][
        "Arn"
    ]
    alias = f"alias/root-kek-{secrets.token_hex(4)}"
    client.create_alias(AliasName=alias, TargetKeyId=arn)
    data = tmp_path / "data"
    data.mkdir()

    def settings(kek: str = f"awskms:{alias}"):
        return load_settings(
            data_dir=data,
            env="test",
            backends={"local": {"type": "softkms"}, "aws": moto_server.backend_settings()},
            root_key_wrap={"backend": "aws", "kek": kek, "file": str(tmp_path / "root.wrapped")},
        )

    return settings, arn, client


def test_root_key_wrapped_by_aws_kms_survives_restarts_and_rotation(aws_unseal_settings):
    settings, arn, client = aws_unseal_settings
    path = init_wrapped_root_key(settings())
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) > 32  # a KMS ciphertext, not the bare key
    service = build_service(settings())
    bearer = service.tokens.create(["admin"], ttl=None)[1]
    admin = service.gate.authenticate(Credentials(bearer=bearer), Ctx("t"))
    service.keys.create(admin, Ctx("t"), NewKey(name="k", type="ed25519", purpose="p"))
    service.close()

    client.rotate_key_on_demand(KeyId=arn)
    # unwraps again after the rotation, with the key named by its ARN instead of its alias
    service = build_service(settings(arn))
    [signed] = service.crypto.sign(
        admin, Ctx("t"), service.gate.target("k"), [SignInput(input=b"m")], False
    )
    assert signed.key_version == 1
    service.close()


def test_aws_wrapping_key_must_be_the_enabled_symmetric_key_that_wrapped(aws_unseal_settings):
    settings, arn, client = aws_unseal_settings
    init_wrapped_root_key(settings())
    signing = client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    with pytest.raises(ConfigError, match=r"ECC_NIST_P256, not aes-256-gcm \(SYMMETRIC_DEFAULT\)"):
        build_service(settings(signing["Arn"]))
    with pytest.raises(ConfigError, match="wrapping key unavailable: no such AWS KMS key"):
        build_service(settings("awskms:alias/no-such-kek"))
    other = client.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")
    with pytest.raises(ConfigError, match="cannot unwrap"):
        build_service(settings(other["KeyMetadata"]["Arn"]))
    # material imported (BYOK): a copy exists outside AWS KMS, and it may expire
    imported = client.create_key(
        KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT", Origin="EXTERNAL"
    )
    with pytest.raises(ConfigError, match="origin is EXTERNAL, not AWS_KMS or AWS_CLOUDHSM"):
        build_service(settings(imported["KeyMetadata"]["Arn"]))
    client.disable_key(KeyId=arn.rpartition("/")[2])
    with pytest.raises(ConfigError, match="not enabled"):
        build_service(settings())


@pytest.fixture
def hsm_unseal_settings(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A SoftHSM token holding AES-256 keys made by pkcs11-tool: `root-kek` and `other-kek`
    private and sensitive (never extractable), `open-kek` not sensitive, `public-kek`
    sensitive but public (usable without the PIN; SoftHSM keeps its value unencrypted)."""
    with softhsm_token(tmp_path_factory, f"unseal-{secrets.token_hex(3)}") as token:
        aes = ("--keygen", "--key-type", "AES:32", "--usage-decrypt")
        protected = (*aes, "--sensitive", "--private")
        token.pkcs11_tool(*protected, "--label", "root-kek", "--id", "7e")
        token.pkcs11_tool(*protected, "--label", "other-kek", "--id", "7f")
        token.pkcs11_tool(*aes, "--label", "open-kek", "--id", "80")
        token.pkcs11_tool(*aes, "--sensitive", "--label", "public-kek", "--id", "81")
        # made extractable, then not: CKA_NEVER_EXTRACTABLE stays false (a copy may exist)
        made_open = (
            "import pkcs11, sys\n"
            "from pkcs11 import Attribute\n"
            "token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])\n"
            "with token.open(rw=True, user_pin=sys.argv[3]) as session:\n"
            "    open_ = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}\n"
            "    key = session.generate_key(pkcs11.KeyType.AES, 256, label='once-open-kek',\n"
            "        store=True, template=open_)\n"
            "    key[Attribute.EXTRACTABLE] = False\n"
        )
        subprocess.run(
            [sys.executable, "-c", made_open, token.hsm.module, token.label, token.pin],
            env=token.hsm.env(),
            check=True,
            timeout=60,
        )
        data = tmp_path / "data"
        data.mkdir()

        def settings(kek: str = "pkcs11:object=root-kek;type=secret-key"):
            return load_settings(
                data_dir=data,
                env="test",
                backends={"local": {"type": "softkms"}, "hsm": token.backend_config()},
                root_key_wrap={
                    "backend": "hsm",
                    "kek": kek,
                    "file": str(tmp_path / "root.wrapped"),
                },
            )

        yield settings


def test_root_key_wrapped_by_a_pkcs11_key_survives_restarts(hsm_unseal_settings):
    """Auto-unseal by an HSM: the root key is wrapped (AES-GCM) by a key that never leaves
    the token; only that key, sensitive and never extractable, unwraps it."""
    settings = hsm_unseal_settings
    path = init_wrapped_root_key(settings())
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) == 12 + 32 + 16  # nonce, the wrapped key, tag
    service = build_service(settings())
    bearer = service.tokens.create(["admin"], ttl=None)[1]
    admin = service.gate.authenticate(Credentials(bearer=bearer), Ctx("t"))
    service.keys.create(admin, Ctx("t"), NewKey(name="k", type="ed25519", purpose="p"))
    service.close()
    service = build_service(settings("pkcs11:id=%7e"))  # the same key, named by its id
    [signed] = service.crypto.sign(
        admin, Ctx("t"), service.gate.target("k"), [SignInput(input=b"m")], False
    )
    assert signed.key_version == 1
    service.close()
    with pytest.raises(ConfigError, match="cannot unwrap"):
        build_service(settings("pkcs11:object=other-kek"))
    with pytest.raises(ConfigError, match="only sensitive, non-extractable keys"):
        build_service(settings("pkcs11:object=open-kek"))
    with pytest.raises(ConfigError, match=r"only private keys \(CKA_PRIVATE\) can be adopted"):
        build_service(settings("pkcs11:object=public-kek"))
    with pytest.raises(ConfigError, match="was extractable or not sensitive at some time"):
        build_service(settings("pkcs11:object=once-open-kek"))
    with pytest.raises(ConfigError, match="wrapping key unavailable: no such key on the token"):
        build_service(settings("pkcs11:object=no-such-kek"))
