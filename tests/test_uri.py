"""kmsgate.uri: backend references and the strict RFC 7512 PKCS#11 URI parser/formatter."""

from __future__ import annotations

import pytest

from kmsgate.errors import InvalidRequest
from kmsgate.uri import Pkcs11Uri, percent_decode, percent_encode, split_ref

# The examples of RFC 7512 section 3 (whitespace removed), with what they must decode to.
RFC_EXAMPLES = [
    ("pkcs11:", {}, {}),
    ("pkcs11:object=my-pubkey;type=public", {"object": b"my-pubkey", "type": b"public"}, {}),
    (
        "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
        {"object": b"my-key", "type": b"private"},
        {"pin-source": b"file:/etc/token"},
    ),
    (
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;"
        "model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial="
        "?pin-source=file:/etc/token_pin",
        {
            "token": b"The Software PKCS#11 Softtoken",
            "manufacturer": b"Snake Oil, Inc.",
            "model": b"1.0",
            "object": b"my-certificate",
            "type": b"cert",
            "id": bytes.fromhex("69953e5cf4bdec91"),
            "serial": b"",
        },
        {"pin-source": b"file:/etc/token_pin"},
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
        {"object": b"my-sign-key", "type": b"private"},
        {"module-name": b"mypkcs11"},
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
        {"object": b"my-sign-key", "type": b"private"},
        {"module-path": b"/mnt/libmypkcs11.so.1"},
    ),
    (
        "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc."
        "?pin-value=the-pin",
        {"token": b"Software PKCS#11 softtoken", "manufacturer": b"Snake Oil, Inc."},
        {"pin-value": b"the-pin"},
    ),
    ("pkcs11:slot-description=Sun%20Metaslot", {"slot-description": b"Sun Metaslot"}, {}),
    (
        "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20"
        "Library;library-version=1.23",
        {
            "library-manufacturer": b"Snake Oil, Inc.",
            "library-description": b"Soft Token Library",
            "library-version": b"1.23",
        },
        {},
    ),
    (
        "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;"
        "id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
        {
            "token": b"My token% created by Joe",
            "library-version": b"3",
            "id": bytes.fromhex("010203badd cafe 040506".replace(" ", "")),
        },
        {},
    ),
    (
        "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
        {"token": b"A name with a substring %;", "object": b"my-certificate", "type": b"cert"},
        {},
    ),
    (
        "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;"
        "object=my-certificate;type=cert",
        {
            "token": "Name with a small A with acute: á".encode(),
            "object": b"my-certificate",
            "type": b"cert",
        },
        {},
    ),
    (
        "pkcs11:slot-manufacturer=Snake%20Oil,%20Inc.;slot-id=812;model=x",
        {"slot-manufacturer": b"Snake Oil, Inc.", "slot-id": b"812", "model": b"x"},
        {},
    ),
]


@pytest.mark.parametrize(("uri", "path", "query"), RFC_EXAMPLES)
def test_rfc_7512_examples_parse(uri, path, query):
    parsed = Pkcs11Uri.parse(uri)
    assert dict(parsed.path) == path
    assert dict(parsed.query) == query
    again = Pkcs11Uri.parse(parsed.format())  # the formatter writes what the parser reads
    assert (dict(again.path), dict(again.query)) == (path, query)


def test_vendor_attributes_only_when_allowed():
    uri = (
        "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
        "?pin-source=file:/etc/token_pin&vendor-bbb=value-b"
    )
    with pytest.raises(InvalidRequest, match="unknown PKCS#11 URI attribute 'vendor-aaa'"):
        Pkcs11Uri.parse(uri)
    parsed = Pkcs11Uri.parse(uri, vendor_attributes={"vendor-aaa", "vendor-bbb"})
    assert parsed.path["vendor-aaa"] == b"value-a"
    assert parsed.query["vendor-bbb"] == b"value-b"
    with pytest.raises(ValueError, match="standard attribute"):
        Pkcs11Uri.parse("pkcs11:", vendor_attributes={"token"})


def test_typed_accessors():
    parsed = Pkcs11Uri.parse("pkcs11:token=t%C3%A9;object=k.v1;id=%00%ff;type=PRIVATE;slot-id=7")
    assert parsed.token == "té"
    assert parsed.object == "k.v1"
    assert parsed.id == b"\x00\xff"
    assert parsed.type == "private"  # ABNF literals match case-insensitively
    assert parsed.slot_id == 7
    assert parsed.serial is None


def test_reserved_characters_allowed_unencoded_per_component():
    parsed = Pkcs11Uri.parse(
        "pkcs11:token=:[]@!$'()*+,=&?x-q=:[]@!$'()*+,=/?|", vendor_attributes=["x-q"]
    )
    assert parsed.token == ":[]@!$'()*+,=&"
    assert parsed.query["x-q"] == b":[]@!$'()*+,=/?|"


def test_attribute_names_are_case_insensitive_and_normalised():
    parsed = Pkcs11Uri.parse("PKCS11:Token=a;OBJECT=b")
    assert dict(parsed.path) == {"token": b"a", "object": b"b"}


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("pkcs12:token=a", "not a PKCS#11 URI"),
        ("token=a", "no scheme"),
        ("pkcs11:token=a;token=b", "more than once"),
        ("pkcs11:token=a;TOKEN=a", "more than once"),
        ("pkcs11:id=%01;object=x;id=%01", "more than once"),
        ("pkcs11:object=a?pin-source=x&pin-source=y", "more than once"),
        ("pkcs11:tokn=a", "unknown PKCS#11 URI attribute 'tokn'"),
        ("pkcs11:x-vendor=a", "unknown"),
        ("pkcs11:object=a?x-vendor=a", "unknown"),
        ("pkcs11:token=a;;object=b", "empty attribute"),
        ("pkcs11:token=a;", "empty attribute"),
        ("pkcs11:;token=a", "empty attribute"),
        ("pkcs11:token", "without '='"),
        ("pkcs11:=a", "malformed attribute name"),
        ("pkcs11:to ken=a", "malformed attribute name"),
        ("pkcs11:token=a%2", "two hex digits"),
        ("pkcs11:token=a%", "two hex digits"),
        ("pkcs11:token=a%G1", "two hex digits"),
        ("pkcs11:token=a%%41", "two hex digits"),
        ("pkcs11:token=a b", "must be percent-encoded"),
        ("pkcs11:token=a/b", "must be percent-encoded"),
        ('pkcs11:token=a"b', "must be percent-encoded"),
        ("pkcs11:token=á", "must be percent-encoded"),
        ("pkcs11:token=a\nb", "must be percent-encoded"),
        ("pkcs11:object=a?module-path=/x;y", "must be percent-encoded"),
        ("pkcs11:token=%FF%FE", "not UTF-8"),
        ("pkcs11:object=%C3", "not UTF-8"),
        ("pkcs11:pin-value=1234", "belongs in the query"),
        ("pkcs11:module-path=/lib/x.so", "belongs in the query"),
        ("pkcs11:object=a?token=b", "belongs in the path"),
        ("pkcs11:type=secret", "must be one of"),
        ("pkcs11:type=", "must be one of"),
        ("pkcs11:type=%70rivate", "must be one of"),
        ("pkcs11:library-version=1.", "digits"),
        ("pkcs11:library-version=a", "digits"),
        ("pkcs11:library-version=1.2.3", "digits"),
        ("pkcs11:slot-id=-1", "decimal slot number"),
        ("pkcs11:slot-id=%31", "decimal slot number"),
        ("pkcs11:slot-id=99999999999999999999999", "decimal slot number"),
        ("pkcs11:token=a?", "empty query"),
        ("pkcs11:token=a#frag", "fragment"),
        ("pkcs11:object=" + "a" * 5000, "longer than"),
    ],
)
def test_malformed_uris_are_refused(uri, message):
    with pytest.raises(InvalidRequest, match=message):
        Pkcs11Uri.parse(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "pkcs11:token=t;object=k;type=private?pin-value=s3cr3t-PIN",
        "pkcs11:token=t;object=k;type=private?pin-source=file:/etc/s3cr3t-PIN",
        "pkcs11:token=t;object=k?module-path=/tmp/s3cr3t-PIN.so",
        "pkcs11:token=t;object=k?module-name=s3cr3t-PIN",
        "pkcs11:token=t;object=k?pin-value=s3cr3t-PIN&module-path=/x",
        "pkcs11:object=k?module-path=/tmp/lib.so&pin-value=s3cr3t-PIN",
    ],
)
def test_key_references_refuse_pin_and_module(uri):
    Pkcs11Uri.parse(uri)  # a valid RFC 7512 URI...
    with pytest.raises(InvalidRequest, match="not allowed in a key reference") as caught:
        Pkcs11Uri.parse_key_reference(uri)  # ...but not a key reference
    assert "s3cr3t-PIN" not in str(caught.value)


def test_key_reference_refuses_vendor_query_and_needs_an_object():
    with pytest.raises(InvalidRequest, match="not allowed in a key reference"):
        Pkcs11Uri.parse_key_reference("pkcs11:id=%01?x-a=1", vendor_attributes=["x-a"])
    for uri in ("pkcs11:", "pkcs11:token=t;type=private", "pkcs11:serial=1234"):
        with pytest.raises(InvalidRequest, match="by 'id' or 'object'"):
            Pkcs11Uri.parse_key_reference(uri)
    assert Pkcs11Uri.parse_key_reference("pkcs11:id=%01").id == b"\x01"
    assert Pkcs11Uri.parse_key_reference("pkcs11:object=k;type=private").object == "k"


@pytest.mark.parametrize(
    "uri",
    [
        "pkcs11:token=%zzs3cr3t-PIN",
        "pkcs11:object=a?pin-value=s3cr3t-PIN%",
        "pkcs11:object=a?pin-value=s3cr3t PIN",
        "pkcs11:object=a?pin-value=s3cr3t-PIN&pin-value=s3cr3t-PIN",
        "pkcs11:pin-value=s3cr3t-PIN",
    ],
)
def test_errors_never_echo_values(uri):
    with pytest.raises(InvalidRequest) as caught:
        Pkcs11Uri.parse(uri)
    assert "s3cr3t" not in str(caught.value)
    assert "s3cr3t" not in repr(Pkcs11Uri({"object": b"x"}, {"pin-value": b"s3cr3t"}))


def test_format_encodes_ids_fully_and_values_where_needed():
    uri = Pkcs11Uri(
        {
            "type": b"private",
            "id": b"\x01ab\xff",
            "object": "my key/é;%".encode(),
            "token": b"kmsgate",
        }
    ).format()
    assert uri == "pkcs11:token=kmsgate;object=my%20key%2F%C3%A9%3B%25;id=%01%61%62%FF;type=private"
    parsed = Pkcs11Uri.parse_key_reference(uri)
    assert (parsed.token, parsed.object, parsed.id, parsed.type) == (
        "kmsgate",
        "my key/é;%",
        b"\x01ab\xff",
        "private",
    )
    query = Pkcs11Uri({"object": b"a"}, {"pin-source": b"file:/a&b"}).format()
    assert query == "pkcs11:object=a?pin-source=file:/a%26b"
    with pytest.raises(InvalidRequest):
        Pkcs11Uri({"type": b"secret"}).format()
    with pytest.raises(InvalidRequest):
        Pkcs11Uri({"Token": b"x"}).format()


def test_percent_codecs():
    assert percent_decode("a%41%4a%4A", {"a"}, "x") == b"aAJJ"
    assert percent_encode(b"a-%\x00\xff") == "a-%25%00%FF"
    assert percent_encode(b"ab", safe=()) == "%61%62"
    with pytest.raises(InvalidRequest, match="x: character"):
        percent_decode("b", {"a"}, "x")


def test_split_ref():
    assert split_ref("softkms:key/1") == ("softkms", "key/1")
    assert split_ref("PKCS11:id=%01") == ("pkcs11", "id=%01")
    for bad in ("", ":x", "1abc:x", "no-scheme", "a b:c"):
        with pytest.raises(InvalidRequest):
            split_ref(bad)
