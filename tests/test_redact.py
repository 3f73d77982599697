"""spoold.redact: the shapes it masks (keeping the key), what it leaves alone, registered secrets, idempotence,
JSON that stays JSON, linear time on adversarial input, and the logging filter."""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import pytest

from spoold.redact import MASK, RedactingFilter, redact, register_secret

PEM_BODY = "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AWsCL7K\nKGh1dZ+qXn2pdmg1VWe0f6Ch5Q==\n"

# (text, exactly what redact() must make of it)
MASKED = [
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY=***"),
    ("export AWS_SECRET_ACCESS_KEY=wJalrXUt && run", "export AWS_SECRET_ACCESS_KEY=*** && run"),
    (
        "[default]\naws_secret_access_key = wJalrXUtnFEMI\nregion = eu-west-1",
        "[default]\naws_secret_access_key = ***\nregion = eu-west-1",
    ),
    ("AWS_SESSION_TOKEN=FQoGZXIvYXdzEJr//////////wEaDM", "AWS_SESSION_TOKEN=***"),
    ("aws_session_token=FQoG", "aws_session_token=***"),
    ("GET /cb?access_token=ya29.a0Af&state=1 200", "GET /cb?access_token=***&state=1 200"),
    ("access_token: ya29.a0Af", "access_token: ***"),
    ("refresh_token=1//0gLx-r3fr3sh", "refresh_token=***"),
    ('{"refresh_token": "1//0g r3fr3sh"}', '{"refresh_token": "***"}'),
    ("client_secret=GOCSPX-abc123", "client_secret=***"),
    ('{"client_id": "app", "client_secret": "GOCSPX-abc123"}', '{"client_id": "app", "client_secret": "***"}'),
    ("db_password=hunter2 host=db", "db_password=*** host=db"),
    ("SMTP_PASSWORD: hunter2", "SMTP_PASSWORD: ***"),
    ("mysql_passwd=pw1 ftp_pwd=pw2", "mysql_passwd=*** ftp_pwd=***"),
    ("PGPASSWORD=pw3 userPassword: pw4", "PGPASSWORD=*** userPassword: ***"),
    ("private_key=abcdef0123", "private_key=***"),
    ("PRIVATE_KEY: abcdef0123", "PRIVATE_KEY: ***"),
    ("api_key=k1 x-api-key: k2 apikey=k3", "api_key=*** x-api-key: *** apikey=***"),
    (
        f"key:\n-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}-----END RSA PRIVATE KEY-----\ndone",
        "key:\n-----BEGIN RSA PRIVATE KEY-----***-----END RSA PRIVATE KEY-----\ndone",
    ),
    (
        f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}-----END PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----***-----END PRIVATE KEY-----",
    ),
    (
        f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_BODY}-----END OPENSSH PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----***-----END OPENSSH PRIVATE KEY-----",
    ),
    (
        f"-----BEGIN ENCRYPTED PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,AB12\n\n{PEM_BODY}"
        "-----END ENCRYPTED PRIVATE KEY-----",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----***-----END ENCRYPTED PRIVATE KEY-----",
    ),
    (
        f"-----BEGIN PGP PRIVATE KEY BLOCK-----\n{PEM_BODY}-----END PGP PRIVATE KEY BLOCK-----",
        "-----BEGIN PGP PRIVATE KEY BLOCK-----***-----END PGP PRIVATE KEY BLOCK-----",
    ),
    (f"truncated: -----BEGIN EC PRIVATE KEY-----\n{PEM_BODY}", "truncated: -----BEGIN EC PRIVATE KEY-----***"),
    (
        f"PRIVATE_KEY=-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}-----END RSA PRIVATE KEY-----",
        "PRIVATE_KEY=-----BEGIN RSA PRIVATE KEY-----***-----END RSA PRIVATE KEY-----",
    ),
    ("Cookie: sid=abc; csrftoken=xyz\nHost: x", "Cookie: ***\nHost: x"),
    ("Set-Cookie: sid=abc; Path=/; HttpOnly", "Set-Cookie: ***"),
    ("Authorization: Basic dXNlcjpwYXNz\nAccept: */*", "Authorization: ***\nAccept: */*"),
    (
        "Authorization: AWS4-HMAC-SHA256 Credential=AKID/20240501/eu-west-1/s3/aws4_request, SignedHeaders=host, "
        "Signature=fe5f80f77d5fa3beca038a248ff027",
        "Authorization: ***",
    ),
    ("Proxy-Authorization: Bearer abc.def\r\nHost: x", "Proxy-Authorization: ***\r\nHost: x"),
    (
        "{'Authorization': b'AWS4-HMAC-SHA256 Signature=abc', 'X-Amz-Date': '20240501T120000Z'}",
        "{'Authorization': b'***', 'X-Amz-Date': '20240501T120000Z'}",
    ),
    (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20240501%2Fs3"
        "&X-Amz-Signature=fe5f80f7&X-Amz-Security-Token=FQoGZX&x-id=PutObject",
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
        "&X-Amz-Signature=***&X-Amz-Security-Token=***&x-id=PutObject",
    ),
    ("sent Bearer eyJhbGciOi.eyJzdWIi.SflKx_w-c= to api", "sent Bearer *** to api"),
    ("sftp://user:pw123@host/x", "sftp://user:***@host/x"),
    ("sftp://user:p@ss@host/x", "sftp://user:***@host/x"),
    ("sftp://user:p:a@s:s@host:2222/in/y@z.bin", "sftp://user:***@host:2222/in/y@z.bin"),
    ("https://me@example.com:s3cret@host/", "https://me@example.com:***@host/"),
    ("ftp://robot:c0rrect%20horse@nas.lan", "ftp://robot:***@nas.lan"),
    ("ship to 'sftp://u:pw@h', then", "ship to 'sftp://u:***@h', then"),
    ('password="correct horse battery" user=bob', 'password="***" user=bob'),
    ("password: 'a b c' next", "password: '***' next"),
    ('{"password": "p w d"}', '{"password": "***"}'),
    ('{"password": "p\\"w\\\\d", "user": "bob"}', '{"password": "***", "user": "bob"}'),
    ('"msg": "login password=\\"a b\\" failed"', '"msg": "login password=\\"***\\" failed"'),
    ("token: xyz987", "token: ***"),
    ("token=abc.txt", "token=***"),
    ("Secret = shh", "Secret = ***"),
    ("passphrase=open sesame", "passphrase=*** sesame"),
    (
        "password=hunter2 https://bob:pw123@host/x Authorization: Bearer abc.def token: xyz987",
        "password=*** https://bob:***@host/x Authorization: ***",
    ),
    ("\u0130stanbul password=hunter2 \u0130", "\u0130stanbul password=*** \u0130"),
]

LEFT_ALONE = [
    "nothing secret here",
    "tokenizer=bpe",
    "token_count=5",
    "tokens_used=3",
    "max_tokens: 100",
    "password_file=/run/credentials/pw",
    "secretary=bob",
    "the password was rejected",
    "password:",
    "password=",
    "password=''",
    "sftp://bob@host:22/in",
    "sftp://host:22/in user@example.com:x",
    "https://example.com/a:b@c",  # the @ is after the first /: no userinfo
    "Bearer",
    '{"token": 5, "secret": null, "api_key": {"id": 1}, "password": ["a"]}',
    '{"note": "password=", "next": "x"}',
    '{"note": "Authorization: ", "next": "x"}',
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqh\n-----END PUBLIC KEY-----",
    "2024-05-01 12:00:00,123 INFO spoold.queue: q/episode_000123 done in 1.2 s",
    "a=" * 50,
    "://" * 50,
]


@pytest.mark.parametrize(("text", "expected"), MASKED, ids=[f"masked{i}" for i in range(len(MASKED))])
def test_secret_shapes_are_masked_and_keys_kept(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", LEFT_ALONE)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize("text", [t for t, _ in MASKED] + LEFT_ALONE)
def test_redact_is_idempotent(text: str) -> None:
    once = redact(text)
    assert redact(once) == once


@pytest.mark.parametrize("secret", ["a.b*c+d?e", "(x)[y]{2}|^$", "back\\slash\\1", 'qu"ote', "$1\\g<0>", "p@ss w0rd"])
def test_registered_secrets_with_metacharacters(secret: str) -> None:
    register_secret(f"  {secret}\n")  # surrounding white space is not part of it
    assert redact(f"x {secret} y {secret}") == f"x {MASK} y {MASK}"
    doc = redact(json.dumps({"error": f"cannot log in with {secret}"}, ensure_ascii=False))
    assert json.loads(doc) == {"error": f"cannot log in with {MASK}"}


def test_registered_secrets_longest_first_and_short_ones_ignored() -> None:
    register_secret("Zq7-part")
    register_secret("Zq7-part-and-more")
    assert redact("a Zq7-part-and-more b Zq7-part c") == f"a {MASK} b {MASK} c"
    register_secret("Zq7")  # under 4 characters: would mask too much
    assert redact("Zq7 ok") == "Zq7 ok"


def test_registered_secret_inside_a_json_escape_keeps_the_document_valid() -> None:
    register_secret("nQ8secretvalue")  # in JSON, "x\n" + "Q8secretvalue" reads `x\nQ8secretvalue`
    text = redact(json.dumps({"a": "x\nQ8secretvalue", "b": "nQ8secretvalue"}))
    assert json.loads(text) == {"a": f"x\n{MASK}", "b": MASK}


def test_redacted_json_stays_json() -> None:
    fragments = ["password", "db_pwd", "token", "Secret_Key", "Authorization", "Cookie", "=", ":", " = ", ": ", '"',
                 "'", "\\", "b'", "://", "u:", "@", "/", " ", "\n", "-----BEGIN RSA PRIVATE KEY-----", "-----",
                 "Bearer ", "abc", "&", ",", "}", "]", "{", MASK, "\u0130", "n"]  # fmt: skip
    rng = random.Random(7)

    def fragment(count: int) -> str:
        return "".join(rng.choice(fragments) for _ in range(count))

    for _ in range(3000):
        doc = {fragment(2): fragment(rng.randint(1, 8)), "token": [fragment(4), 5, None], "n": {fragment(3): 1}}
        for indent in (None, 2):
            text = json.dumps(doc, indent=indent, ensure_ascii=False)
            masked = redact(text)
            json.loads(masked)
            assert redact(masked) == masked
        raw = fragment(rng.randint(1, 12))
        assert redact(redact(raw)) == redact(raw)


ADVERSARIAL = ["a=", "password", "password=", "password: '", "://", "://a:", "a@", "@", "x", "aZ9_.-+/", " ",
               "\\", "-----BEGIN RSA PRIVATE KEY-----", "Authorization: ", "Bearer ", "pwd=x ", "://:x@",
               "token: \""]  # fmt: skip


def _best_time(text: str, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        redact(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("unit", ADVERSARIAL)
def test_redact_is_linear_on_adversarial_input(unit: str) -> None:
    # 8x the input must cost about 8x the time; quadratic behaviour would show ~64x. Ratios, not seconds, so a
    # busy machine does not fail it; the smaller input gets more runs since its best time is the noisier one.
    small = unit * (256 * 1024 // len(unit))
    large = small * 8
    ratio = _best_time(large, 2) / _best_time(small, 5)
    assert ratio < 30, f"{ratio:.1f}x the time for 8x the input"


def test_redacting_filter_masks_message_args_and_traceback() -> None:
    register_secret("Fq9-traceback-secret")
    try:
        raise ValueError("connect with Fq9-traceback-secret failed")
    except ValueError:
        record = logging.LogRecord("spoold", logging.ERROR, __file__, 1, "url %s password=%s", None, None)
        record.args = ("sftp://u:pw@h/x", "hunter2")
        import sys

        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "url sftp://u:***@h/x password=***"
    assert record.exc_text is not None
    assert "Fq9-traceback-secret" not in record.exc_text
    assert f"connect with {MASK} failed" in record.exc_text


def test_register_and_redact_from_many_threads() -> None:
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for round_ in range(20):
                secret = f"thread-{index}-secret-{round_}"
                register_secret(secret)
                assert secret not in redact(f"log {secret} line password=x")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
