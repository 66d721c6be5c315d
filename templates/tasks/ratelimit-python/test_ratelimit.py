import unittest

from ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RateLimiterTest(unittest.TestCase):
    def test_a_burst_up_to_the_capacity_is_allowed(self) -> None:
        limiter = RateLimiter(rate=1, capacity=3, clock=FakeClock())
        self.assertEqual([limiter.allow("a") for _ in range(4)], [True, True, True, False])

    def test_tokens_come_back_with_time(self) -> None:
        clock = FakeClock()
        limiter = RateLimiter(rate=2, capacity=1, clock=clock)
        self.assertTrue(limiter.allow("a"))
        self.assertFalse(limiter.allow("a"))
        clock.now += 0.5
        self.assertTrue(limiter.allow("a"))

    def test_keys_are_independent(self) -> None:
        limiter = RateLimiter(rate=1, capacity=1, clock=FakeClock())
        self.assertTrue(limiter.allow("a"))
        self.assertTrue(limiter.allow("b"))


if __name__ == "__main__":
    unittest.main()
