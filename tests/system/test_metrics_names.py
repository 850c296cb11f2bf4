"""A gateway with the Redis broker exports exactly the golden list of metric names
(tests/unit/test_metrics_golden.py), the broker's Redis-only numbers included (the backend
hooks' numbers are checked where hooks are configured: test_webhook_delivery.py)."""
from tests.helpers import serve
from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.unit.test_metrics_golden import (GOLDEN, HOOKS_ONLY_PREFIXES, MEMORY_ONLY, PROCESS, _traffic_and_scrape,
                                           scraped_lines)
from tests.auth_tokens import SECRET


def test_a_redis_backed_gateway_exports_exactly_the_golden_list(run, redis_server):  # noqa: F811
    async def main():
        async with serve(api_keys=("k" * 32,), jwt_secret=SECRET, broker=redis_server.url) as gw:
            return await _traffic_and_scrape(gw)

    golden = [line for line in GOLDEN if line.split()[0] not in MEMORY_ONLY and not line.startswith(HOOKS_ONLY_PREFIXES)]
    assert scraped_lines(run(main())) == sorted(golden + PROCESS)
