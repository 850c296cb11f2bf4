"""gateway/security/limits.py without sockets: Origin policy, client IP behind proxies, counters, token bucket."""
import pytest

from gateway.errors import ConfigError
from gateway.security.limits import ClientAddress, ConnectionCounter, OriginPolicy, TokenBucket, ip_key

POLICY = OriginPolicy(["https://app.example.com", "https://*.example.org", "http://localhost:3000"])


@pytest.mark.parametrize("origin, allowed", [
    ("https://app.example.com", True),
    ("HTTPS://APP.EXAMPLE.COM", True),                 # scheme and host are case-insensitive
    ("https://app.example.com:443", True),             # the default port is implied
    ("https://app.example.com:8443", False),
    ("http://app.example.com", False),                 # scheme matters
    ("https://app.example.com.evil.net", False),
    ("https://a.example.org", True),
    ("https://a.b.example.org", True),
    ("https://example.org", False),                    # a wildcard needs a subdomain
    ("https://badexample.org", False),                 # ... and a dot boundary
    ("http://a.example.org", False),
    ("http://localhost:3000", True),
    ("http://localhost", False),
    ("null", False),
    ("https://app.example.com/path", False),           # not an origin
    ("garbage", False),
    (None, True),                                      # no Origin: not a browser
])
def test_origin_allow_list(origin, allowed):
    assert (POLICY.check(origin) is None) is allowed


def test_origin_reason_is_sanitised():
    reason = OriginPolicy(["https://a.com"]).check('https://evil.com"\x07')
    assert reason is not None and "\x07" not in reason and '"' not in reason.strip("'")


def test_origin_wildcards_and_defaults():
    assert OriginPolicy([]).check("https://anything.net") is None          # no list: any origin
    assert OriginPolicy(["*"]).check("https://anything.net") is None
    assert OriginPolicy(["null"]).check("null") is None
    same = OriginPolicy([], same_origin_default=True)                       # cookie auth, no list
    assert same.check("https://gw.example.com", "gw.example.com") is None
    assert same.check("http://127.0.0.1:8080", "127.0.0.1:8080") is None
    assert same.check("https://evil.com", "gw.example.com") is not None
    assert same.check("http://127.0.0.1:9999", "127.0.0.1:8080") is not None


@pytest.mark.parametrize("entry", ["app.example.com", "https://a.*.com", "https://*", "https://x.com/path",
                                   "https://x.com:99999"])
def test_bad_origin_entries_are_config_errors(entry):
    with pytest.raises(ConfigError, match="allowed_origins"):
        OriginPolicy([entry])


def test_client_address_only_trusts_configured_proxies():
    none = ClientAddress([])
    assert none.resolve("203.0.113.7:5555", "1.2.3.4", "5.6.7.8") == "203.0.113.7"     # headers ignored
    proxy = ClientAddress(["127.0.0.1", "10.0.0.0/8"])
    assert proxy.resolve("203.0.113.7:5555", "1.2.3.4") == "203.0.113.7"                # peer not a proxy
    assert proxy.resolve("127.0.0.1:5555", "198.51.100.9") == "198.51.100.9"
    # the client forged a left-most entry; nginx appended the real address; a second proxy hop
    assert proxy.resolve("127.0.0.1:1", "6.6.6.6, 198.51.100.9, 10.1.2.3") == "198.51.100.9"
    assert proxy.resolve("127.0.0.1:1", "10.0.0.5, 10.0.0.6") == "10.0.0.5"             # all trusted: left-most
    assert proxy.resolve("127.0.0.1:1", "", "198.51.100.10") == "198.51.100.10"         # X-Real-IP
    assert proxy.resolve("127.0.0.1:1", "not-an-ip") == "127.0.0.1"                     # garbage: the proxy
    assert proxy.resolve("127.0.0.1:1", "[2001:db8::1]:443") == "2001:db8::1"
    assert proxy.resolve("::1:5555") == "::1"
    with pytest.raises(ConfigError, match="trusted_proxies"):
        ClientAddress(["10.0.0.0/33"])


def test_ip_key_groups_ipv6_by_64():
    assert ip_key("192.0.2.1") == "192.0.2.1"
    assert ip_key("2001:db8:1:2::1") == ip_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    # dual-stack sockets report IPv4 clients as ::ffff:a.b.c.d: still one key per IPv4 address
    assert ip_key("::ffff:192.0.2.1") == "192.0.2.1" != ip_key("::ffff:192.0.2.2")
    assert ClientAddress([]).resolve("::ffff:192.0.2.1:4000") == "192.0.2.1"


def test_connection_counter_frees_entries():
    counter = ConnectionCounter(2)
    counter.add("a")
    assert not counter.full("a")
    counter.add("a")
    assert counter.full("a") and not counter.full("b")
    counter.remove("a")
    counter.remove("a")
    assert counter.counts == {}                        # no memory kept per address ever seen
    assert not ConnectionCounter(0).full("a")


def test_token_bucket():
    bucket = TokenBucket(rate=8, burst=5, now=0.0)     # times below are exact binary fractions
    assert bucket.take(5, clock=lambda: 0.0) == 5                # the burst
    assert bucket.take(1, clock=lambda: 0.0) == 0
    assert bucket.take(1, clock=lambda: 0.125) == 1              # 8/s: one token per 125 ms
    assert bucket.take(3, clock=lambda: 0.375) == 2              # partial: two of three fit
    assert bucket.take(100, clock=lambda: 100.0) == 5            # refill caps at the burst


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(origin=st.text(max_size=80), host=st.text(max_size=40), peer=st.text(max_size=50),
       forwarded=st.text(max_size=80), real_ip=st.text(max_size=40))
def test_arbitrary_header_values_never_raise(origin, host, peer, forwarded, real_ip):
    for policy in (POLICY, OriginPolicy([], same_origin_default=True)):
        reason = policy.check(origin, host)
        assert reason is None or ("\n" not in reason and len(reason) < 200)
    for addresses in (ClientAddress([]), ClientAddress(["127.0.0.1", "::1", "10.0.0.0/8"])):
        ip = addresses.resolve(peer or "127.0.0.1:1", forwarded, real_ip)
        assert isinstance(ip, str)
        ip_key(ip)
